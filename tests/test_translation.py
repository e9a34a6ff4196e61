"""Pure translation: OpenAI chat requests -> Poe queries, failures -> OpenAI errors, config."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from mitmproxy.proxy.mode_specs import ProxyMode

from addon import chat
from addon.config import ConfigError, normalize_host, parse_settings, split_secrets
from addon.errors import OpenAIError, PoeFailure, classify_failure
from addon.mappings import MappingError, ModelMap, load_mappings, parse_mappings
from addon.routing import is_answered
from addon.service import TextEvents, sse
from addon.tokens import TokenCounter

MAP = ModelMap({"gpt-4o": "GPT-4o", "gpt-3.5-turbo": "ChatGPT-16k"})


def parse(**body: object) -> chat.ChatRequest:
    body.setdefault("model", "gpt-4o")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return chat.parse_chat_request(body, MAP)


def bad(param: str | None, **body: object) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        parse(**body)
    assert info.value.status in (400, 404)
    assert info.value.param == param
    return info.value


def test_roles_map_to_poe_roles() -> None:
    req = parse(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": "dev rule"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ]
    )
    assert [(m.role, m.content) for m in req.messages] == [
        ("system", "be brief"),
        ("system", "dev rule"),
        ("user", "hi"),
        ("bot", "hello"),
        ("tool", '{"tool_call_id": "c1", "name": "", "content": "42"}'),
    ]


def test_text_parts_are_joined() -> None:
    req = parse(
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]
    )
    assert req.messages[0].content == "a\nb"


def test_unsupported_part_is_a_clear_400() -> None:
    err = bad(
        "messages[0].content[1].type",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "listen"},
                    {"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}},
                ],
            }
        ],
    )
    assert err.status == 400 and "input_audio" in err.message


def test_model_map_and_unmapped_names() -> None:
    assert parse(model="gpt-3.5-turbo").bot == "ChatGPT-16k"
    assert parse(model="GPT-4O").bot == "GPT-4o"  # case-insensitive
    assert parse(model="Claude-Opus-4.1").bot == "Claude-Opus-4.1"  # straight to Poe
    assert bad(None, model="not a bot/name").code == "model_not_found"


@pytest.mark.parametrize(
    ("param", "body"),
    [
        ("model", {"model": ""}),
        ("model", {"model": 5}),
        ("messages", {"messages": []}),
        ("messages", {"messages": "hi"}),
        ("messages[0]", {"messages": ["hi"]}),
        ("messages[0].role", {"messages": [{"role": "wizard", "content": "x"}]}),
        ("messages[0].content", {"messages": [{"role": "user"}]}),
        ("messages[0].content", {"messages": [{"role": "user", "content": 3}]}),
        ("temperature", {"temperature": 3}),
        ("temperature", {"temperature": "hot"}),
        ("stop", {"stop": 5}),
        ("stream", {"stream": "yes"}),
        ("n", {"n": 11}),
        ("n", {"n": 0}),
        ("max_tokens", {"max_tokens": -5}),
        ("max_completion_tokens", {"max_completion_tokens": "lots"}),
        ("response_format", {"response_format": {"type": "xml"}}),
        ("logit_bias", {"logit_bias": {"1": "x"}}),
        ("stream_options", {"stream_options": True}),
    ],
)
def test_invalid_fields_name_the_param(param: str, body: dict[str, object]) -> None:
    assert bad(param, **body).status == 400


def test_optional_parameters_forwarded_only_when_sent() -> None:
    plain = chat.to_query(parse(), iter(["u", "c", "m"]).__next__)
    assert plain.temperature is None and plain.stop_sequences == [] and plain.logit_bias == {}
    query = chat.to_query(
        parse(temperature=0.3, stop="END", logit_bias={"50256": -100}), lambda: "x"
    )
    assert query.temperature == 0.3
    assert query.stop_sequences == ["END"]
    assert query.logit_bias == {"50256": -100.0}
    assert parse(stop=["a", "b"]).stop == ["a", "b"]


def test_token_counts_are_openai_bpe_counts() -> None:
    counter = TokenCounter("gpt-4o")
    assert counter.count("Hello world, this is a test.") == 8  # o200k_base
    assert TokenCounter("gpt-3.5-turbo").count("Hello world") == 2  # cl100k_base
    assert counter.prefix("Hello world, this is a test.", 2) == "Hello world"
    assert counter.messages(["hi", "there"]) == 1 + 1 + 2 * 3 + 3
    assert chat.usage(5, 7) == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def test_json_mode_adds_an_instruction() -> None:
    req = parse(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"a": 1}}}
    )
    assert req.json_mode and req.messages[0].role == "system"
    assert '{"a": 1}' in req.messages[0].content
    req = parse(
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}],
        response_format={"type": "json_object"},
    )
    assert req.messages[0].content.startswith("be brief\n\nAnswer with one valid JSON object")


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "client_key", "status", "code", "no_retry"),
    [
        (
            PoeFailure("b", status=401, body='{"detail":"bad key"}'),
            True,
            401,
            "invalid_api_key",
            False,
        ),
        (PoeFailure("b", status=401), False, 502, "poe_key_rejected", True),
        (PoeFailure("b", status=402), False, 429, "insufficient_quota", True),
        (PoeFailure("b", status=404), False, 404, "model_not_found", False),
        (PoeFailure("b", status=429, retry_after="7"), False, 429, "rate_limit_exceeded", False),
        (PoeFailure("b", status=500), False, 502, "poe_error", False),
        (PoeFailure("b", status=503), False, 502, "poe_error", False),
        (PoeFailure("b", transport="ConnectError"), False, 502, "poe_unreachable", False),
        (
            PoeFailure("b", event={"text": "You have exceeded rate limit for this bot."}),
            False,
            429,
            "rate_limit_exceeded",
            False,
        ),
        (
            PoeFailure("b", event={"text": "No points", "error_type": "insufficient_fund"}),
            False,
            429,
            "insufficient_quota",
            True,
        ),
        (
            PoeFailure("b", event={"text": "Internal server error", "allow_retry": True}),
            False,
            502,
            "poe_error",
            False,
        ),
        (
            PoeFailure("b", event={"text": "too long", "error_type": "user_message_too_long"}),
            False,
            400,
            "context_length_exceeded",
            False,
        ),
    ],
)
def test_poe_failures_map_to_openai_errors(
    failure: PoeFailure, client_key: bool, status: int, code: str, no_retry: bool
) -> None:
    err = classify_failure(failure, client_key=client_key)
    assert (err.status, err.code) == (status, code)
    assert (err.headers.get("x-should-retry") == "false") is no_retry
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    if failure.retry_after:
        assert err.headers["retry-after"] == failure.retry_after


# --- configuration --------------------------------------------------------------------------


def settings(**kw: object) -> object:
    args: dict[str, object] = {
        "poe_api_key": "",
        "poe_access_tokens": [],
        "poe_mappings": "mappings/default.yaml",
        "poe_hosts": ["api.openai.com"],
        "poe_base_url": "https://api.poe.com/bot/",
        "poe_upload_url": "https://www.quora.com/poe_api/",
        "poe_proxy": "",
        "environ": {},
    }
    args.update(kw)
    return parse_settings(**args)  # type: ignore[arg-type]


def test_keys_from_option_or_environment() -> None:
    assert settings(poe_api_key="a, b,a").api_keys == ("a", "b")
    assert settings(environ={"POE_API_KEY": "e1,e2"}).api_keys == ("e1", "e2")
    assert settings(poe_api_key="o", environ={"POE_API_KEY": "e"}).api_keys == ("o",)
    assert settings().auth_mode == "pass-through"


@pytest.mark.parametrize(
    ("kw", "names"),
    [
        ({"poe_access_tokens": ["t"]}, "poe_access_tokens"),
        ({"poe_hosts": []}, "poe_hosts"),
        ({"poe_base_url": "ftp://x"}, "poe_base_url"),
        ({"poe_upload_url": "nope"}, "poe_upload_url"),
        ({"poe_proxy": "gopher://x"}, "poe_proxy"),
        ({"poe_mappings": "no/such.yaml"}, "poe_mappings"),
    ],
)
def test_bad_options_name_the_option(kw: dict[str, object], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        settings(**kw)


def test_relative_mappings_resolve_against_the_repository(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert settings().mappings_path == Path(__file__).resolve().parent.parent / (
        "mappings/default.yaml"
    )
    assert settings(poe_base_url="http://127.0.0.1:9/bot").base_url == "http://127.0.0.1:9/bot/"


def test_split_and_normalize() -> None:
    assert split_secrets(["a,b", " c ", ""]) == ("a", "b", "c")
    assert normalize_host("API.OpenAI.com:443") == "api.openai.com"
    assert normalize_host("[::1]:8080") == "::1"


def test_default_map_holds_the_original_table_and_current_bots() -> None:
    m = load_mappings(Path(__file__).resolve().parent.parent / "mappings/default.yaml")
    assert m.bot_for("gpt-3.5-turbo") == "ChatGPT-16k"
    assert m.bot_for("gpt-4-turbo-preview") == "Claude-3-Opus"
    assert m.bot_for("FLUX-pro-1.1") == "FLUX-pro-1.1"
    for bot in ("GPT-4.1", "o3", "Grok-4", "Claude-Sonnet-4-Reasoning", "Deepseek-v3"):
        assert m.models[bot] == bot


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("models:\n  a: b\n  c: d: e\n", 3, "not valid YAML"),
        ("models:\n  a: b\n  c:\n    - x\n", 4, "must be a string"),
        ("models:\n  a: b\nbots: {}\n", 3, "unknown key"),
        ("models:\n  a: b c\n", 2, "not a Poe bot name"),
        ("models:\n  a: b\n  a: c\n", 3, "twice"),
    ],
)
def test_mapping_errors_give_the_line(text: str, line: int, needle: str) -> None:
    with pytest.raises(MappingError) as info:
        parse_mappings(text, "m.yaml")
    assert f"m.yaml, line {line}" in str(info.value)
    assert needle in str(info.value)


def test_routing_by_mode_host_and_sni() -> None:
    hosts = {"api.openai.com"}
    reverse = ProxyMode.parse("reverse:https://api.openai.com")
    other_reverse = ProxyMode.parse("reverse:https://example.com")
    regular = ProxyMode.parse("regular")
    kw = {"host": "1.2.3.4", "host_header": None, "sni": None}
    assert is_answered(reverse, hosts, **kw)
    assert not is_answered(other_reverse, hosts, host="x", host_header="api.openai.com", sni=None)
    assert is_answered(regular, hosts, host="1.2.3.4", host_header="API.openai.com:443", sni=None)
    assert is_answered(regular, hosts, host="1.2.3.4", host_header=None, sni="api.openai.com")
    assert not is_answered(
        regular, hosts, host="example.com", host_header="example.com", sni="example.com"
    )


@pytest.mark.parametrize(
    "text",
    ["", "a", 'quote " and \\ backslash', "line\nbreak\ttab", "é中文🙂", "\ud800 lone", "\x00"],
)
@pytest.mark.parametrize(
    "model", ["gpt-4o", 'odd "model" \u2028', "\x00poe-openai text goes here\x00"]
)
def test_content_events_from_a_template_are_the_full_rendering(text: str, model: str) -> None:
    # Each streamed token is rendered from a template made once per stream; the bytes must be
    # exactly what rendering the whole chunk would give (the last model name holds the
    # template's own placeholder, so that stream falls back to full rendering).
    for usage in (False, True):
        chunks = chat.ChunkFactory("chatcmpl-1", 1700000000, model, usage)
        for index in (0, 3):
            events = TextEvents(partial(chunks.content, index=index))
            assert events(text) == sse(chunks.content(text, index))
