"""Defects found in review, each pinned by a test that failed before its fix."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, http_error, json_event, replace, sleep, text
from harness import Mitmdump, assert_no_traceback
from mitmproxy import io as mitmio

pytestmark = [
    pytest.mark.both_stand_ins,  # FakePoe and fastapi-poe's own bot server
    pytest.mark.both_transports,  # answers given in-process and over the loopback hop
]

USER = [{"role": "user", "content": "hi"}]


def slow(n: int = 20) -> list[object]:
    return [text("start")] + [s for _ in range(n) for s in (sleep(0.25), text("."))]


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_before_the_answer_drops_the_poe_query(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    # Non-streamed: the client gives up while Poe is still answering. Streamed: the client
    # gives up while Poe is still silent (before the first event).
    fake_poe.script(bot, slow() if not stream else [sleep(3.0), *slow()])  # type: ignore[list-item]
    body = {"model": bot, "messages": USER, "stream": stream}
    with proxy.http() as http:
        assert http.get("/v1/models").status_code == 200  # a warm proxy: timing is the point
    with pytest.raises(httpx.ReadTimeout), proxy.http(timeout=1.0) as http:
        http.post("/v1/chat/completions", json=body)
    left = time.monotonic()
    assert fake_poe.wait_for(lambda: fake_poe.requests_for(bot)[0].disconnected is not None, 3)
    seen = fake_poe.requests_for(bot)[0]
    assert seen.finished is None
    assert seen.disconnected is not None and seen.disconnected - left < 0.5


def test_keys_not_saved_even_for_flows_cut_by_shutdown(
    fake_poe: FakePoe, bot: str, tmp_path: Path
) -> None:
    flows = tmp_path / "flows.mitm"
    fake_poe.script(bot, [sleep(30), text("late")])
    m = Mitmdump(options=poe_options(fake_poe), extra_args=["-w", str(flows)]).start()

    def ask() -> None:
        try:
            with m.http(timeout=20) as http:
                http.post(
                    "/v1/chat/completions",
                    json={"model": bot, "messages": USER},
                    headers={"authorization": f"Bearer {POE_KEY}"},
                )
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=ask)
    thread.start()
    assert fake_poe.wait_for(lambda: bool(fake_poe.requests_for(bot)), 10)
    m.stop()
    thread.join()
    data = flows.read_bytes()
    assert POE_KEY.encode() not in data
    with flows.open("rb") as f:
        saved = list(mitmio.FlowReader(f).stream())
    assert saved and all("redacted key#" in f.request.headers["authorization"] for f in saved)


def test_b64_images_never_fetch_links_from_the_bots_text(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    secret = fake_poe.host_file(f"{bot}-internal", b"INTERNAL-ONLY", "image/png")
    fake_poe.script(bot, [text(f"![x]({secret})")])  # a link in text, not a Poe file event
    before = len(fake_poe.downloads)
    with pytest.raises(openai.APIStatusError) as info:
        proxy.reverse_client().images.generate(model=bot, prompt="x", response_format="b64_json")
    assert info.value.status_code == 502
    assert len(fake_poe.downloads) == before


@pytest.mark.parametrize("stream", [False, True])
def test_json_mode_with_a_tool_call_answer(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    call = {
        "index": 0,
        "id": "c1",
        "type": "function",
        "function": {"name": "f", "arguments": "{}"},
    }
    fake_poe.script(bot, [json_event({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})])
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
    }
    client = proxy.reverse_client()
    kwargs = {
        "model": bot,
        "messages": USER,
        "tools": [tool],
        "response_format": {"type": "json_object"},
    }
    if stream:
        with client.chat.completions.stream(**kwargs) as s:  # type: ignore[arg-type]
            result = s.get_final_completion()
    else:
        result = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert result.choices[0].finish_reason == "tool_calls"
    assert result.choices[0].message.tool_calls[0].function.name == "f"


def test_responses_non_streamed_gets_poes_final_text(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("Draft answer"), replace("Final answer")])
    client = proxy.reverse_client()
    made = client.responses.create(model=bot, input="hi")
    assert made.output_text == "Final answer"
    assert client.chat.completions.create(model=bot, messages=USER).choices[0].message.content == (
        "Final answer"
    )


def test_non_ascii_token_is_401_not_500(proxy_tokens: Mitmdump) -> None:
    with proxy_tokens.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={"model": "x", "messages": USER},
            headers={"authorization": b"Bearer t\xf6k"},
        )
    assert r.status_code == 401
    assert "Traceback" not in proxy_tokens.output


@pytest.mark.fake_poe_only(
    reason="http_error(): fastapi-poe's bot server always answers with an event stream"
)
def test_models_need_no_usable_key(fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [http_error(402, {"detail": "no points"})])
    with Mitmdump(options=poe_options(fake_poe, poe_api_key=POE_KEY), regular=False) as m:
        client = m.reverse_client()
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=bot, messages=USER)
        assert client.models.list().data  # no Poe key is spent or needed to list models


def test_n_choices_are_separate_poe_queries(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("x")])
    proxy.reverse_client().chat.completions.create(model=bot, messages=USER, n=3)
    ids = {r.body["message_id"] for r in fake_poe.requests_for(bot)}
    assert len(ids) == 3


def test_addon_made_errors_carry_cors(fake_poe: FakePoe, bot: str) -> None:
    with (
        Mitmdump(
            options=poe_options(fake_poe, poe_api_key=POE_KEY, poe_max_body_mb="1"), regular=False
        ) as m,
        m.http() as http,
    ):
        r = http.post(
            "/v1/chat/completions",
            content=json.dumps({"x": "y" * 2_000_000}),
            headers={"origin": "http://localhost:3000"},
        )
    assert r.status_code == 413
    assert r.headers["access-control-allow-origin"] == "*"


# --- found by the fuzz suite (tests/test_fuzz.py) -------------------------------------------


def _openai_error(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["type"], error
    return error


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "a \\udfff b"}]}',
    ],
)
def test_lone_escaped_surrogate_is_400_not_500(proxy: Mitmdump, raw: bytes) -> None:
    with proxy.http() as http:
        r = http.post("/v1/chat/completions", content=raw)
    assert "surrogate" in str(_openai_error(r, 400)["message"])


def test_escaped_surrogate_pair_is_an_ordinary_character(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("ok")])
    raw = b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}' % (
        bot.encode()
    )
    with proxy.http() as http:
        r = http.post("/v1/chat/completions", content=raw)
    assert r.status_code == 200, r.text
    query = fake_poe.requests_for(bot)[0].query
    assert query is not None and query.query[-1].content == "\N{GRINNING FACE}"


def test_role_of_the_wrong_type_is_400(proxy: Mitmdump) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": [], "content": "x"}]
    with proxy.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "m", "messages": messages})
    assert _openai_error(r, 400)["param"] == "messages[1].role"


@pytest.mark.parametrize("depth", [5000, 480])
def test_deeply_nested_json_is_400(proxy: Mitmdump, depth: int) -> None:
    # 5000 levels: too deep to parse. 480 (two levels each): parses, but too deep for a
    # walk over the tool's schema.
    since = len(proxy.lines)
    schema = b'{"type": "object", "properties": {"a": ' * depth + b"{}" + b"}}" * depth
    tool = b'{"type": "function", "function": {"name": "f", "parameters": %s}}' % schema
    messages = b'[{"role": "user", "content": "hi"}]'
    raw = b'{"model": "m", "messages": %s, "tools": [%s]}' % (messages, tool)
    with proxy.http() as http:
        r = http.post("/v1/chat/completions", content=raw)
        assert "too deeply" in str(_openai_error(r, 400)["message"])
        assert http.get("/v1/models").status_code == 200
    assert_no_traceback("".join(proxy.lines[since:]))


def test_ref_fan_out_in_a_tool_schema_is_400_at_once(proxy: Mitmdump) -> None:
    # Each def names the next 50 times: inlined, 50**7 values. Refused while inlining, not
    # after (which would take the proxy's event loop for ever).
    defs = {
        f"d{i}": {
            "type": "object",
            "properties": {f"p{j}": {"$ref": f"#/$defs/d{i + 1}"} for j in range(50)},
        }
        for i in range(7)
    }
    defs["d7"] = {"type": "string"}
    parameters = {"type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}, "$defs": defs}
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    with proxy.http(timeout=10) as http:
        r = http.post("/v1/chat/completions", json=body)
        assert "too large" in str(_openai_error(r, 400)["message"])
        assert http.get("/v1/models").status_code == 200


def test_path_no_route_can_match_is_openai_404(proxy: Mitmdump) -> None:
    with proxy.http() as http:
        r = http.get("/%0A%00")
    assert _openai_error(r, 404)["code"] == "unknown_url"


@pytest.mark.parametrize(
    "asked",
    [
        {"access-control-request-method": "POST", "access-control-request-private-network": "true"},
        {"access-control-request-method": "PROPFIND"},
    ],
)
def test_cors_preflights(proxy: Mitmdump, asked: dict[str, str]) -> None:
    headers = {"origin": "https://chat.example", **asked}
    with proxy.http() as http:
        r = http.options("/v1/chat/completions", headers=headers)
    if asked["access-control-request-method"] == "POST":
        # a public web page calling the proxy on localhost (Private Network Access)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-private-network"] == "true"
    else:
        assert _openai_error(r, 400)["message"].startswith("CORS preflight refused")
        assert r.headers["access-control-allow-origin"] == "*"


def test_a_stream_right_after_start_up_is_streamed(fake_poe: FakePoe, bot: str) -> None:
    # The token tables take about a second to load. The first request used to load them
    # itself when it came before the start-up thread finished: the event loop stalled, and
    # the whole answer arrived at once at the end, for every flow at that moment.
    fake_poe.script(bot, [text("a"), sleep(0.6), text("b")])
    opts = poe_options(fake_poe, poe_api_key=POE_KEY)
    m = Mitmdump(options=opts, regular=False)
    client = m.reverse_client()  # made first: the request must come right after start-up
    with m:
        arrivals: dict[str, float] = {}
        # max_tokens: the answer's tokens are counted as it streams, so the tables are needed
        stream = client.chat.completions.create(
            model=bot, messages=USER, stream=True, max_tokens=100
        )
        for chunk in stream:
            content = chunk.choices[0].delta.content if chunk.choices else None
            if content:
                arrivals[content] = time.monotonic()
        assert arrivals["b"] - arrivals["a"] > 0.4  # "a" came before "b" was even sent


@pytest.mark.parametrize("method", ["FOO", "0", "PROPFIND"])
def test_a_method_no_route_takes_gets_an_openai_405(proxy: Mitmdump, method: str) -> None:
    # The fuzz suite found these answered with the loopback parser's plain-text 400
    # ("Invalid HTTP request received.") once the loopback server parsed with httptools.
    with proxy.http() as http:
        r = http.request(method, "/v1/models?x=1")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert r.json()["error"]["message"] == f"Method {method} is not allowed on /v1/models."
    assert r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e999"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/images/generations", '{"model": "%s", "prompt": "x", "poe_parameters": {"a": %s}}'),
        ("/v1/chat/completions", '{"model": "%s", "messages": [], "temperature": %s}'),
    ],
)
def test_numbers_json_has_not_are_a_400_before_poe(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, path: str, body: str, number: str
) -> None:
    # Python's json reads NaN/Infinity (and 1e999 as inf); sent on to Poe they made a query
    # fastapi-poe could not serialise: a paid-looking 502 "could not reach Poe". Found by fuzz.
    fake_poe.script(bot, [text("never asked")])
    with proxy.http() as http:
        r = http.post(
            path, content=body % (bot, number), headers={"content-type": "application/json"}
        )
    assert r.status_code == 400, r.text
    assert "not valid JSON" in r.json()["error"]["message"]
    assert fake_poe.requests_for(bot) == []
