"""Order of judgement, through a real mitmdump: for every endpoint, what is checked in which
order (auth -> body -> fields -> model -> key -> Poe) and the status each failure gets, while
the configured key is healthy, resting (rate-limited), out of points and rejected.

A request that fails an early check never reaches a later one: a body that is not JSON is a
400 even when every key rests, and only a request that passes every check spends a key.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import ACCESS_TOKEN, POE_KEY, poe_options
from fake_poe import FakePoe, error, file, http_error, text
from harness import Mitmdump, assert_no_traceback, free_port
from test_standalone import start, wait_port

from addon.config import fingerprint

MB = 1024 * 1024
pytestmark = pytest.mark.both_transports  # answers given in-process and over the loopback hop
UNKNOWN_KEY = "poe-key-poe-does-not-know"  # the stand-in answers it 401
BAD_MODEL = "no such model!"  # not a valid Poe bot name: 404 without asking Poe
USER = [{"role": "user", "content": "hi"}]


@dataclass
class Endpoint:
    path: str
    valid: dict[str, Any]  # with "{bot}" for the model
    bad_field: dict[str, Any]  # a field error (and, to check the order, an unknown model)
    image: bool = False


ENDPOINTS = {
    "chat": Endpoint(
        "/v1/chat/completions",
        {"messages": USER},
        {"model": BAD_MODEL, "messages": []},
    ),
    "completions": Endpoint(
        "/v1/completions",
        {"prompt": "hi"},
        {"model": BAD_MODEL, "prompt": 5},
    ),
    "responses": Endpoint(
        "/v1/responses",
        {"input": "hi"},
        {"model": BAD_MODEL, "input": 5},
    ),
    "images": Endpoint(
        "/v1/images/generations",
        {"prompt": "a cat"},
        {"model": BAD_MODEL, "prompt": ""},
        image=True,
    ),
}

# (what is wrong, status, code), in the order the proxy judges; each row's request also
# fails every later check, so its answer shows which check comes first.
ROWS = [
    ("no token, body not JSON", 401, "invalid_api_key"),
    ("no token, body over the limit", 401, "invalid_api_key"),
    ("body not JSON", 400, None),
    ("body not an object", 400, None),
    ("body over the limit (content-length)", 413, "request_too_large"),
    ("body over the limit (chunked)", 413, "request_too_large"),
    ("field wrong, model unknown", 400, None),
    ("model unknown", 404, "model_not_found"),
]

# The answer to a request that passes every check, by key state.
KEY_ANSWER = {
    "healthy": (200, None),
    "resting": (429, "rate_limit_exceeded"),
    "out of points": (429, "insufficient_quota"),
    "rejected": (502, "poe_key_rejected"),
}


@dataclass
class Judged:
    proxy: Mitmdump
    state: str
    key: str
    bot: str  # answers text (when healthy)
    image_bot: str  # answers a picture (when healthy)


@pytest.fixture(scope="module", params=list(KEY_ANSWER))
def judged(
    request: pytest.FixtureRequest, fake_poe: FakePoe, transport: dict[str, str]
) -> Iterator[Judged]:
    """A proxy with access tokens and one configured key, brought to a key state by one
    request whose Poe answer rests or rejects the key."""
    state: str = request.param
    key = UNKNOWN_KEY if state == "rejected" else POE_KEY
    opts = poe_options(
        fake_poe,
        poe_api_key=key,
        poe_access_tokens=ACCESS_TOKEN,
        poe_max_body_mb="1",
        **transport,
    )
    bot, image_bot = (f"Judged-{uuid.uuid4().hex[:8]}" for _ in range(2))
    fake_poe.script(bot, [text("ok")])
    fake_poe.script(image_bot, [file("https://pfst.test/cat.png", "image/png", "cat.png")])
    with Mitmdump(options=opts, regular=False) as m:
        if state != "healthy":
            spoiler = f"Spoiler-{uuid.uuid4().hex[:8]}"
            failure = {
                "resting": http_error(429, {"detail": "slow down"}, {"Retry-After": "3600"}),
                "out of points": http_error(402, {"detail": "no points"}),
                "rejected": text("never sent: Poe rejects the key first"),
            }[state]
            fake_poe.script(spoiler, [failure])
            with m.http() as http:
                r = http.post(
                    "/v1/chat/completions",
                    json={"model": spoiler, "messages": USER},
                    headers=token(),
                )
            assert r.status_code in (429, 502), r.text
            assert len(fake_poe.requests_for(spoiler)) == 1
        yield Judged(m, state, key, bot, image_bot)


def token(value: str = ACCESS_TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


def chunks(size: int) -> Iterator[bytes]:
    """A body with no content-length (sent chunked), ``size`` bytes of a JSON string."""
    yield b'{"pad": "'
    sent = 10
    while sent < size:
        piece = min(64 * 1024, size - sent)
        yield b"x" * piece
        sent += piece
    yield b'"}'


def send(http: httpx.Client, endpoint: Endpoint, row: str, model: str) -> httpx.Response:
    valid = {"model": model, **endpoint.valid}
    if row == "no token, body not JSON":
        return http.post(endpoint.path, content=b"{not json")
    if row == "no token, body over the limit":
        return http.post(endpoint.path, json={**valid, "pad": "x" * MB})
    if row == "body not JSON":
        return http.post(endpoint.path, content=b"{not json", headers=token())
    if row == "body not an object":
        return http.post(endpoint.path, json=[valid], headers=token())
    if row == "body over the limit (content-length)":
        return http.post(endpoint.path, json={**valid, "pad": "x" * MB}, headers=token())
    if row == "body over the limit (chunked)":
        return http.post(endpoint.path, content=chunks(MB + 1), headers=token())
    if row == "field wrong, model unknown":
        return http.post(endpoint.path, json=endpoint.bad_field, headers=token())
    if row == "model unknown":
        return http.post(endpoint.path, json={**valid, "model": BAD_MODEL}, headers=token())
    raise AssertionError(row)


def assert_error(r: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.mark.parametrize("name", list(ENDPOINTS))
def test_order_of_judgement(judged: Judged, fake_poe: FakePoe, name: str) -> None:
    endpoint = ENDPOINTS[name]
    model = judged.image_bot if endpoint.image else judged.bot
    before = len(fake_poe.requests_for(model))
    with judged.proxy.http() as http:
        for row, status, code in ROWS:
            r = send(http, endpoint, row, model)
            error = assert_error(r, status, code)
            if row.startswith("field wrong"):  # the field is named, not the model
                assert error["param"] != "model", (row, error)
        assert len(fake_poe.requests_for(model)) == before, "a refused request reached Poe"

        # Everything right: now (and only now) a key is picked.
        r = http.post(endpoint.path, json={"model": model, **endpoint.valid}, headers=token())
    status, code = KEY_ANSWER[judged.state]
    reached_poe = len(fake_poe.requests_for(model)) - before
    if judged.state == "healthy":
        assert r.status_code == 200, r.text
        assert reached_poe == 1
        return
    error = assert_error(r, status, code)
    assert reached_poe == 0  # a resting or rejected key is not tried again
    # Each state says what it is, and names the key by its fingerprint, never the key.
    assert fingerprint(judged.key) in error["message"]
    assert judged.key not in r.text
    if judged.state == "resting":
        assert "rate-limited" in error["message"]
        assert 3500 <= int(r.headers["retry-after"]) <= 3600
        assert "x-should-retry" not in r.headers  # waiting it out is the right thing
    else:
        assert r.headers["x-should-retry"] == "false"
        assert "retry-after" not in r.headers
    if judged.state == "out of points":
        assert "out of points" in error["message"] and "rejected by" not in error["message"]
    if judged.state == "rejected":
        assert "rejected by Poe" in error["message"] and "poe_api_key" in error["message"]
        assert "rate-limited" not in error["message"] and "points" not in error["message"]


def test_previous_response_id_is_judged_before_the_key(judged: Judged, fake_poe: FakePoe) -> None:
    """The Responses API's own lookups: an unknown or malformed previous_response_id is a
    404/400 whatever the key's state, and never reaches Poe."""
    before = len(fake_poe.requests_for(judged.bot))
    body = {"model": judged.bot, "input": "hi"}
    with judged.proxy.http() as http:
        r = http.post(
            "/v1/responses", json={**body, "previous_response_id": "resp_nope"}, headers=token()
        )
        error = assert_error(r, 404, "not_found")
        assert error["param"] == "previous_response_id"
        r = http.post("/v1/responses", json={**body, "previous_response_id": 5}, headers=token())
        assert assert_error(r, 400, None)["param"] == "previous_response_id"
        for method in ("GET", "DELETE"):
            r = http.request(method, "/v1/responses/resp_nope", headers=token())
            assert_error(r, 404, "not_found")
            r = http.request(method, "/v1/responses/resp_nope")
            assert_error(r, 401, "invalid_api_key")
    assert len(fake_poe.requests_for(judged.bot)) == before


def test_models_need_a_token_but_no_key(judged: Judged) -> None:
    """Listing models spends nothing: it answers whatever the key's state."""
    with judged.proxy.http() as http:
        assert_error(http.get("/v1/models"), 401, "invalid_api_key")
        r = http.get("/v1/models", headers=token())
        assert r.status_code == 200 and r.json()["object"] == "list"
        assert_error(http.get("/v1/models/not-mapped", headers=token()), 404, "model_not_found")


def test_pass_through_order(proxy_passthrough: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    """Without configured keys the client's key is the Poe key: it is checked for presence
    first, and a key Poe rejects is the client's 401, after every other check."""
    fake_poe.script(bot, [text("ok")])
    path = "/v1/chat/completions"
    with proxy_passthrough.http() as http:
        assert_error(http.post(path, content=b"{not json"), 401, "invalid_api_key")
        for key in (UNKNOWN_KEY, POE_KEY):
            r = http.post(path, content=b"{not json", headers=token(key))
            assert_error(r, 400, None)
            r = http.post(path, json={"model": BAD_MODEL, "messages": USER}, headers=token(key))
            assert_error(r, 404, "model_not_found")
        assert fake_poe.requests_for(bot) == []
        r = http.post(path, json={"model": bot, "messages": USER}, headers=token(UNKNOWN_KEY))
        error = assert_error(r, 401, "invalid_api_key")
        assert UNKNOWN_KEY not in json.dumps(error)
        r = http.post(path, json={"model": bot, "messages": USER}, headers=token(POE_KEY))
        assert r.status_code == 200
    assert [q.api_key for q in fake_poe.requests_for(bot)] == [UNKNOWN_KEY, POE_KEY]


# --- the body limit, enforced while the body is read ---------------------------------------------


def sized_chat(bot: str, size: int) -> bytes:
    """A valid chat body of exactly ``size`` bytes (two messages: each stays countable)."""
    head = b'{"model": "%s", "messages": [{"role": "user", "content": "' % bot.encode()
    mid = b'"}, {"role": "user", "content": "'
    tail = b'"}]}'
    pad = size - len(head) - len(mid) - len(tail)
    body = head + b"x" * (pad // 2) + mid + b"y" * (pad - pad // 2) + tail
    assert len(body) == size and json.loads(body)
    return body


@pytest.fixture(scope="module")
def small_body_proxy(fake_poe: FakePoe, transport: dict[str, str]) -> Iterator[Mitmdump]:
    opts = poe_options(fake_poe, poe_api_key=POE_KEY, poe_max_body_mb="1", **transport)
    with Mitmdump(options=opts) as m:
        yield m


def chunked_request(port: int, body: bytes, finish: bool) -> tuple[float, bytes]:
    """POST ``body`` chunked over a raw socket (optionally never ending it); the seconds until
    the status line arrived after the last chunk was sent, and the answer's head."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for i in range(0, len(body), 64 * 1024):
            piece = body[i : i + 64 * 1024]
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        if finish:
            s.sendall(b"0\r\n\r\n")
        sent = time.monotonic()
        s.settimeout(10)
        head = b""
        with contextlib.suppress(TimeoutError):
            while b"\r\n\r\n" not in head:
                data = s.recv(65536)
                if not data:
                    break
                head += data
        return time.monotonic() - sent, head


def test_chunked_body_over_the_limit_is_413_before_it_ends(
    small_body_proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    """A chunked body has no content-length to check: it is refused the moment it passes
    poe_max_body_mb, not read whole first (here it never even ends)."""
    fake_poe.script(bot, [text("ok")])
    port = small_body_proxy.reverse_port
    assert port is not None
    chunked_request(port, sized_chat(bot, 1000), finish=True)  # token tables loaded
    waited, head = chunked_request(port, sized_chat(bot, MB + 1), finish=False)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert waited < 3
    for size in (MB, MB - 1):  # at and under the limit: answered
        _, head = chunked_request(port, sized_chat(bot, size), finish=True)
        assert head.startswith(b"HTTP/1.1 200"), head
    assert_no_traceback(small_body_proxy.output)


@pytest.mark.parametrize("size", [MB + 1, MB, MB - 1])
def test_http2_body_without_length(
    small_body_proxy: Mitmdump, fake_poe: FakePoe, bot: str, size: int
) -> None:
    """HTTP/2 through the explicit proxy, the body streamed from stdin with no content-length
    (httpx offers no h2 inside a proxy tunnel; curl does)."""
    fake_poe.script(bot, [text("ok")])
    cmd = [
        "curl",
        "-s",
        "--http2",
        "-x",
        small_body_proxy.proxy_url,
        "--cacert",
        str(small_body_proxy.ca_file),
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-T",
        "-",
        "-w",
        "\n%{http_code} http_version=%{http_version}",
        "https://api.openai.com/v1/chat/completions",
    ]
    done = subprocess.run(cmd, input=sized_chat(bot, size), capture_output=True, timeout=30)
    out = done.stdout.decode()
    body, _, tail = out.rpartition("\n")
    assert tail.endswith("http_version=2"), out[-300:]
    if size > MB:
        assert tail.startswith("413") and json.loads(body)["error"]["code"] == "request_too_large"
    else:
        assert tail.startswith("200"), out[-300:]


# --- errors name the field the client sent -------------------------------------------------------

CALL = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
NAMELESS_CALL = {"type": "function_call", "call_id": "c2", "name": None, "arguments": "{}"}
OUTPUTS = [
    {"type": "function_call_output", "call_id": "c1", "output": "1"},
    {"type": "function_call_output", "call_id": "c2", "output": "2"},
]
BAD_TEXT = {"role": "user", "content": [{"type": "input_text", "text": 5}]}

# (Responses request fields, the param the error must name, text the message must not hold)
RESPONSES_ERRORS = [
    ({"input": [{"role": "user", "content": "a"}, BAD_TEXT]}, "input[1].content[0].text"),
    (
        {"instructions": "be brief", "input": [{"role": "user", "content": "a"}, BAD_TEXT]},
        "input[1].content[0].text",
    ),
    ({"input": [BAD_TEXT]}, "input[0].content[0].text"),
    (
        {"input": [{"role": "user", "content": "hi"}, CALL, NAMELESS_CALL, *OUTPUTS]},
        "input[2].name",
    ),
    ({"input": "hi", "max_output_tokens": -1}, "max_output_tokens"),
    ({"input": "hi", "text": {"format": {"type": "bogus"}}}, "text.format"),
    ({"input": "hi", "tools": [{"type": "function", "parameters": {}}]}, "tools[0].name"),
    (
        {"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": "x"}]},
        "tools[0].parameters",
    ),
    ({"input": "hi", "poe_parameters": []}, "poe_parameters"),
    ({"input": "hi", "text": 5}, "text"),  # was silently ignored
    ({"input": "hi", "text": {"format": "json"}}, "text.format"),  # was silently ignored
]


@pytest.mark.parametrize(("fields", "param"), RESPONSES_ERRORS)
def test_responses_errors_name_the_responses_field(
    proxy: Mitmdump, bot: str, fields: dict[str, Any], param: str
) -> None:
    """A Responses request is validated by the chat parser (one path), but its errors name
    the Responses field: never messages[i] (with indices shifted by instructions or merged
    tool calls), max_completion_tokens or response_format."""
    with proxy.http() as http:
        r = http.post("/v1/responses", json={"model": bot, **fields})
    error = assert_error(r, 400, None)
    assert error["param"] == param, error
    for chat_word in ("messages", "max_completion_tokens", "response_format", ".function"):
        assert chat_word not in error["message"] and chat_word not in error["param"], error


# Fields images shares with chat: the same answers for the same mistakes.
SHARED_FIELDS = [
    ({"poe_parameters": []}, "poe_parameters"),
    ({"poe_parameters": ""}, "poe_parameters"),
    ({"poe_parameters": 5}, "poe_parameters"),
    ({"model": ""}, "model"),
    ({"model": 5}, "model"),
    ({"model": []}, "model"),
]


@pytest.mark.parametrize(("fields", "param"), SHARED_FIELDS)
def test_images_and_chat_judge_shared_fields_alike(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, fields: dict[str, Any], param: str
) -> None:
    fake_poe.script(bot, [text("ok")])
    chat_body = {"model": bot, "messages": USER, **fields}
    image_body = {"model": bot, "prompt": "a cat", **fields}
    with proxy.http() as http:
        chat = assert_error(http.post("/v1/chat/completions", json=chat_body), 400, None)
        image = assert_error(http.post("/v1/images/generations", json=image_body), 400, None)
    assert chat == image and chat["param"] == param
    assert fake_poe.requests_for(bot) == []


@pytest.mark.parametrize("value", ["", [], 0])
def test_images_response_format_falsy_values_are_refused(
    proxy: Mitmdump, bot: str, value: object
) -> None:
    """`or "url"` took any falsy value for the default; only a missing (or null) one is."""
    with proxy.http() as http:
        body = {"model": bot, "prompt": "a cat", "response_format": value}
        error = assert_error(http.post("/v1/images/generations", json=body), 400, None)
    assert error["param"] == "response_format"


def test_plain_server_refuses_a_chunked_body_before_it_ends(fake_poe: FakePoe, bot: str) -> None:
    """The same limit in the plain server (no mitmproxy in front): read chunk by chunk."""
    fake_poe.script(bot, [text("ok")])
    port = free_port()
    env = {
        "POE_API_KEY": POE_KEY,
        "POE_BASE_URL": fake_poe.base_url,
        "POE_MAX_BODY_MB": "1",
    }
    proc = start(["serve", "--port", str(port)], env)
    try:
        wait_port(port, proc)
        chunked_request(port, sized_chat(bot, 1000), finish=True)  # token tables loaded
        waited, head = chunked_request(port, sized_chat(bot, MB + 1), finish=False)
        assert head.startswith(b"HTTP/1.1 413"), head
        assert waited < 3
        _, head = chunked_request(port, sized_chat(bot, MB), finish=True)
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        # In-band: may concern this bot only; the keys stay usable, Poe's answer is given.
        (error("out of points", error_type="insufficient_fund"), 429, "insufficient_quota"),
        (error("You have exceeded rate limit for this bot."), 429, "rate_limit_exceeded"),
        # HTTP: the keys' own state; the answer names each key.
        (http_error(402, {"detail": "no points"}), 429, "insufficient_quota"),
        (http_error(401, {"detail": "bad key"}), 502, "poe_key_rejected"),
    ],
)
def test_every_key_failing_says_what_happened(
    fake_poe: FakePoe, bot: str, failure: Any, status: int, code: str
) -> None:
    """Two configured keys, both failing: the answer says what happened, never 'rejected'
    for keys Poe did not reject (nor a rate limit for keys out of points)."""
    fake_poe.script(bot, [failure])
    opts = poe_options(fake_poe, poe_api_key=f"{POE_KEY},poe-second-key")
    with Mitmdump(options=opts, regular=False) as m, m.http() as http:
        r = http.post("/v1/chat/completions", json={"model": bot, "messages": USER})
        error_body = assert_error(r, status, code)
        assert len(fake_poe.requests_for(bot)) == 2  # each key tried once
        if code == "poe_key_rejected":
            for key in (POE_KEY, "poe-second-key"):
                assert fingerprint(key) in error_body["message"]
            assert "poe_api_key" in error_body["message"]
        else:
            assert "rejected" not in error_body["message"]
