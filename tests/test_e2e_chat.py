"""End to end: the official openai SDK -> real mitmdump with the addon -> stand-in Poe server."""

from __future__ import annotations

import itertools
import json
import subprocess
import time

import httpx
import openai
import pytest
from conftest import POE_KEY
from fake_poe import (
    FakePoe,
    cut,
    echo,
    error,
    file,
    meta,
    replace,
    sleep,
    suggested,
    text,
)
from harness import Mitmdump
from openapi_schema import validate

pytestmark = [
    pytest.mark.both_stand_ins,  # FakePoe and fastapi-poe's own bot server
    pytest.mark.both_transports,  # answers given in-process and over the loopback hop
]
HTTP_ERROR_ONLY_IN_FAKE_POE = pytest.mark.fake_poe_only(
    reason="http_error(): fastapi-poe's bot server always answers with an event stream"
)

USER = [{"role": "user", "content": "hi"}]


def test_reverse_mode_chat_reaches_poe_with_roles_and_configured_key(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [meta(content_type="text/markdown"), text("Hello"), text(" there")])
    client = proxy.reverse_client(api_key="whatever-the-client-says")
    result = client.chat.completions.create(
        model=bot,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": "no emoji"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you"},
        ],
    )
    assert result.choices[0].message.content == "Hello there"
    assert result.choices[0].finish_reason == "stop"
    assert result.model == bot
    assert result.id.startswith("chatcmpl-")
    assert abs(result.created - time.time()) < 60
    assert result.usage is not None and result.usage.completion_tokens > 0
    validate(result.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")

    [seen] = fake_poe.requests_for(bot)
    assert seen.api_key == POE_KEY  # the configured key, never the client's
    assert seen.query is not None
    assert [(m.role, m.content) for m in seen.query.query] == [
        ("system", "be brief"),
        ("system", "no emoji"),
        ("user", "hi"),
        ("bot", "hello"),
        ("user", "how are you"),
    ]


def test_raw_response_matches_the_spec(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("ok")])
    with proxy.http() as http:
        r = http.post("/v1/chat/completions", json={"model": bot, "messages": USER})
    assert r.status_code == 200
    validate(r.json(), "CreateChatCompletionResponse")


def test_explicit_proxy_mode_intercepts_api_openai_com(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("via CONNECT")])
    client = proxy.proxy_client()
    assert str(client.base_url).startswith("https://api.openai.com")
    result = client.chat.completions.create(model=bot, messages=USER)
    assert result.choices[0].message.content == "via CONNECT"
    chunks = list(client.chat.completions.create(model=bot, messages=USER, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "via CONNECT"
    assert len(fake_poe.requests_for(bot)) == 2


def test_explicit_proxy_over_http2_streams(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    # httpx does not offer h2 inside a proxy tunnel; curl does.
    fake_poe.script(bot, [text("a"), sleep(0.5), text("b")])
    body = json.dumps({"model": bot, "messages": USER, "stream": True})
    cmd = [
        "curl",
        "-sN",
        "--http2",
        "-x",
        proxy.proxy_url,
        "--cacert",
        str(proxy.ca_file),
        "-H",
        "authorization: Bearer x",
        "-H",
        "content-type: application/json",
        "-d",
        body,
        "-w",
        "\nhttp_version=%{http_version}\n",
        "https://api.openai.com/v1/chat/completions",
    ]
    arrivals: list[tuple[float, str]] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as curl:
        assert curl.stdout is not None
        for line in curl.stdout:
            arrivals.append((time.monotonic(), line))
    out = "".join(line for _, line in arrivals)
    assert "http_version=2" in out
    assert '"content":"a"' in out and '"content":"b"' in out and "data: [DONE]" in out
    t_a = next(t for t, line in arrivals if '"content":"a"' in line)
    t_b = next(t for t, line in arrivals if '"content":"b"' in line)
    assert t_b - t_a > 0.35  # "a" arrived before "b" was even sent


def test_streaming_is_incremental(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("one"), sleep(0.5), text(" two"), sleep(0.5), text(" three")])
    client = proxy.reverse_client()
    arrivals: list[tuple[float, str]] = []
    for chunk in client.chat.completions.create(model=bot, messages=USER, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
    assert [t for _, t in arrivals] == ["one", " two", " three"]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    # Each chunk arrives when Poe sends it, not all together at the end.
    assert all(0.3 < g < 1.5 for g in gaps), gaps


def test_stream_chunks_follow_the_spec(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("Hel"), text("lo")])
    with proxy.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": bot,
                "messages": USER,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    for c in chunks:
        validate(c, "CreateChatCompletionStreamResponse")
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes.count("stop") == 1 and finishes[-1] == "stop"
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["Hel", "lo"]
    # include_usage: a last chunk with no choices and the usage; usage null before it
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


def test_no_usage_chunk_unless_asked(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("x")])
    chunks = list(
        proxy.reverse_client().chat.completions.create(model=bot, messages=USER, stream=True)
    )
    assert all(c.choices for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_status_never_leaks(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    fake_poe.script(
        bot,
        [
            replace("Thinking..."),
            sleep(0.05),
            replace("Thinking... (1s elapsed)"),
            replace(""),
            text("Four"),
            text("."),
            suggested("Ask another?"),
        ],
    )
    client = proxy.reverse_client()
    if stream:
        chunks = list(client.chat.completions.create(model=bot, messages=USER, stream=True))
        answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        answer = client.chat.completions.create(model=bot, messages=USER).choices[0].message.content
    assert answer == "Four."


@pytest.mark.parametrize("stream", [False, True])
def test_files_become_markdown_links(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    fake_poe.script(
        bot, [text("Here it is"), file("https://pfst.test/cat.png", "image/png", "cat.png")]
    )
    client = proxy.reverse_client()
    if stream:
        chunks = client.chat.completions.create(model=bot, messages=USER, stream=True)
        answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        answer = client.chat.completions.create(model=bot, messages=USER).choices[0].message.content
    assert answer == "Here it is\n\n![cat.png](https://pfst.test/cat.png)"


def test_parameters_forwarded_only_when_sent(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [echo()])
    client = proxy.reverse_client()
    client.chat.completions.create(model=bot, messages=USER)
    client.chat.completions.create(
        model=bot, messages=USER, temperature=0.2, stop=["END", "STOP"], logit_bias={"42": -50}
    )
    plain, tuned = (r.body for r in fake_poe.requests_for(bot))
    assert plain["temperature"] is None and plain["stop_sequences"] == []
    assert plain["logit_bias"] == {}
    assert tuned["temperature"] == 0.2
    assert tuned["stop_sequences"] == ["END", "STOP"]
    assert tuned["logit_bias"] == {"42": -50.0}


def test_mapped_model_name_goes_to_its_bot(proxy: Mitmdump, fake_poe: FakePoe) -> None:
    fake_poe.script("ChatGPT-16k", [text("mapped")])
    result = proxy.reverse_client().chat.completions.create(model="gpt-3.5-turbo", messages=USER)
    assert result.choices[0].message.content == "mapped"
    assert result.model == "gpt-3.5-turbo"
    assert fake_poe.requests_for("ChatGPT-16k")


def test_models_list_and_lookup(proxy: Mitmdump) -> None:
    client = proxy.reverse_client()
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert "gpt-3.5-turbo" in ids and "Claude-Sonnet-4" in ids
    with proxy.http() as http:
        raw = http.get("/v1/models")
        validate(raw.json(), "ListModelsResponse")
        one = http.get("/v1/models/gpt-4o")
        validate(one.json(), "Model")
        assert one.json()["id"] == "gpt-4o"
    assert client.models.retrieve("gpt-4o").owned_by == "poe"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("Some-Unmapped-Bot")
    assert info.value.code == "model_not_found"
    assert "Poe as bot names" in info.value.message or "bot of that name" in info.value.message


def test_routes_without_v1_prefix(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("short path")])
    with proxy.http() as http:
        assert http.get("/models").status_code == 200
        r = http.post("/chat/completions", json={"model": bot, "messages": USER})
    assert r.json()["choices"][0]["message"]["content"] == "short path"


def test_cors_preflight_and_header(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("x")])
    origin = {"origin": "http://localhost:3210"}
    with proxy.http() as http:
        pre = http.options(
            "/v1/chat/completions",
            headers={
                **origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization,content-type",
            },
        )
        assert pre.status_code in (200, 204)
        assert pre.headers["access-control-allow-origin"] in ("*", origin["origin"])
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        r = http.post("/v1/chat/completions", json={"model": bot, "messages": USER}, headers=origin)
        assert r.headers["access-control-allow-origin"] in ("*", origin["origin"])
        assert http.options("/v1/models").status_code in (200, 204)


def test_other_paths_are_openai_404s_never_forwarded(proxy: Mitmdump) -> None:
    client = proxy.reverse_client()
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert "not available through Poe" in info.value.message
    with proxy.http() as http:
        r = http.get("/v1/some/unknown/path")
        assert r.status_code == 404
        validate(r.json(), "ErrorResponse")


@pytest.mark.fake_poe_only(reason="any host will do: FakePoe answers any bot path")
def test_other_hosts_pass_through_untouched(proxy: Mitmdump, fake_poe: FakePoe) -> None:
    # The stand-in is just some other HTTP server here: its answer must come back as it is.
    with httpx.Client(proxy=proxy.proxy_url, trust_env=False) as http:
        r = http.post(
            f"http://127.0.0.1:{fake_poe.port}/bot/Nobody",
            json={"type": "settings"},
            headers={"authorization": f"Bearer {POE_KEY}"},
        )
    assert r.status_code == 200 and r.json() == {}


# --- errors ---------------------------------------------------------------------------------


def test_malformed_json_and_bad_fields_are_400(proxy: Mitmdump) -> None:
    with proxy.http() as http:
        r = http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400
        validate(r.json(), "ErrorResponse")
        r = http.post("/v1/chat/completions", json={"model": "x", "messages": "hi"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        proxy.reverse_client().chat.completions.create(model="gpt-4o", messages=[], stream=True)
    assert info.value.param == "messages"


def test_unknown_bot_is_404_model_not_found(proxy: Mitmdump, bot: str) -> None:
    # `bot` is not scripted: the stand-in answers 404 as Poe does for an unknown bot.
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as info:
            proxy.reverse_client().chat.completions.create(model=bot, messages=USER, stream=stream)
        assert info.value.code == "model_not_found"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("script", "exc", "status", "code", "no_retry"),
    [
        pytest.param(
            [("http", 429, {"detail": "slow down"}, {"Retry-After": "7"})],
            openai.RateLimitError,
            429,
            "rate_limit_exceeded",
            False,
            marks=HTTP_ERROR_ONLY_IN_FAKE_POE,
        ),
        (
            [error("You have exceeded rate limit for this bot. Please try again later.")],
            openai.RateLimitError,
            429,
            "rate_limit_exceeded",
            False,
        ),
        pytest.param(
            [("http", 402, {"detail": "no points"}, None)],
            openai.RateLimitError,
            429,
            "insufficient_quota",
            True,
            marks=HTTP_ERROR_ONLY_IN_FAKE_POE,
        ),
        (
            [error("You have run out of points", error_type="insufficient_fund")],
            openai.RateLimitError,
            429,
            "insufficient_quota",
            True,
        ),
        pytest.param(
            [("http", 500, {"detail": "boom"}, None)],
            openai.APIStatusError,
            502,
            "poe_error",
            False,
            marks=HTTP_ERROR_ONLY_IN_FAKE_POE,
        ),
        pytest.param(
            [("http", 503, "unavailable", None)],
            openai.APIStatusError,
            502,
            "poe_error",
            False,
            marks=HTTP_ERROR_ONLY_IN_FAKE_POE,
        ),
        (
            [error("Internal server error", allow_retry=True)],
            openai.APIStatusError,
            502,
            "poe_error",
            False,
        ),
    ],
)
def test_poe_failures_before_the_answer(
    proxy_passthrough: Mitmdump,
    fake_poe: FakePoe,
    bot: str,
    script: list[object],
    exc: type[openai.APIStatusError],
    status: int,
    code: str,
    no_retry: bool,
    stream: bool,
) -> None:
    from fake_poe import http_error

    steps = [http_error(s[1], s[2], s[3]) if isinstance(s, tuple) else s for s in script]
    fake_poe.script(bot, steps)  # type: ignore[arg-type]
    # Pass-through (the client's own key): no key pool state carries over to other tests;
    # what a configured key's failures do to the pool is tested in test_e2e_keys.py.
    client = proxy_passthrough.reverse_client(api_key="poe-second-key")
    with pytest.raises(exc) as info:
        client.chat.completions.create(model=bot, messages=USER, stream=stream)
    err = info.value
    assert err.status_code == status
    assert err.code == code
    assert (err.response.headers.get("x-should-retry") == "false") is no_retry
    validate(err.response.json(), "ErrorResponse")
    if status == 429 and code == "rate_limit_exceeded" and isinstance(script[0], tuple):
        assert err.response.headers["retry-after"] == "7"
    assert len(fake_poe.requests_for(bot)) == 1  # no hidden retries spending points


def test_rejected_client_key_in_pass_through_is_401(
    proxy_passthrough: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("x")])
    with pytest.raises(openai.AuthenticationError) as info:
        proxy_passthrough.reverse_client(api_key="not-a-poe-key").chat.completions.create(
            model=bot, messages=USER
        )
    assert info.value.code == "invalid_api_key"


def test_poe_unreachable_is_502(fake_poe: FakePoe, bot: str) -> None:
    from harness import free_port

    dead = f"http://127.0.0.1:{free_port()}/bot/"
    with Mitmdump(options={"poe_base_url": dead, "poe_api_key": POE_KEY}, regular=False) as m:
        with pytest.raises(openai.APIStatusError) as info:
            m.reverse_client().chat.completions.create(model=bot, messages=USER)
        assert info.value.status_code == 502
        assert info.value.code == "poe_unreachable"


def test_failure_after_streaming_began_is_an_error_event(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("partial "), text("answer"), error("Internal server error")])
    stream = proxy.reverse_client().chat.completions.create(model=bot, messages=USER, stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    assert "".join(got) == "partial answer"
    assert "Internal server error" in info.value.message


@pytest.mark.fake_poe_only(reason="cut(): a connection dropped mid-stream")
def test_cut_connection_mid_stream_never_duplicates(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("first part "), sleep(0.05), cut()])
    stream = proxy.reverse_client().chat.completions.create(model=bot, messages=USER, stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    assert got == ["first part "]
    assert len(fake_poe.requests_for(bot)) == 1  # fastapi-poe's retry would resend it


@pytest.mark.fake_poe_only(reason="cut(): a connection dropped mid-stream")
def test_cut_connection_without_stream_is_502(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("first part "), cut()])
    with pytest.raises(openai.APIStatusError) as info:
        proxy.reverse_client().chat.completions.create(model=bot, messages=USER)
    assert info.value.status_code == 502
    assert len(fake_poe.requests_for(bot)) == 1


def test_proxy_keeps_serving_after_errors(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("still here")])
    with proxy.http() as http:
        for body in (b"", b"[]", b"null", b'{"model": 1}', b"\xff\xfe"):
            assert http.post("/v1/chat/completions", content=body).status_code == 400
    result = proxy.reverse_client().chat.completions.create(model=bot, messages=USER)
    assert result.choices[0].message.content == "still here"
