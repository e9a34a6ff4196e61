"""Every limit the proxy has, at, just under and just over its edge, through the real mitmdump:
the request body (poe_max_body_mb), a file (poe_max_file_mb), tool schemas and poe_parameters
(depth and size, addon/bounds.py), the history, and ``n`` (chat, legacy completions, images);
with realistic and degenerate content (one repeated character, one huge line, deep nesting),
streamed and not. A refused request never reaches Poe; an accepted one is answered.

(The chunked body read while it arrives and a 1.2 MB message's token count are covered
elsewhere: tests/test_e2e_judgement.py and tests/test_e2e_paid_answers.py.)
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, file, text
from harness import Mitmdump

from addon.bounds import MAX_DEPTH, MAX_NODES
from addon.chat import MAX_CHOICES, MAX_STOP
from addon.images import MAX_IMAGES
from addon.tools import MAX_TOOLS

MB = 1024 * 1024
pytestmark = pytest.mark.both_transports  # answers given in-process and over the loopback hop
BODY_LIMIT = 1 * MB  # poe_max_body_mb=1 (small_body below)
FILE_LIMIT = 1 * MB  # poe_max_file_mb=1 (the session's proxy)
EDGES = {"under": -1, "at": 0, "over": 1}
STORE_SIZE = 3  # poe_response_store_size (small_body)


@pytest.fixture(scope="module")
def small_body(fake_poe: FakePoe, transport: dict[str, str]) -> Iterator[Mitmdump]:
    opts = poe_options(
        fake_poe, poe_max_body_mb="1", poe_response_store_size=str(STORE_SIZE), **transport
    )
    with Mitmdump(options=opts, env={"POE_API_KEY": POE_KEY}, regular=False) as m:
        yield m


def post(proxy: Mitmdump, path: str, body: bytes | dict[str, Any]) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with proxy.http(timeout=60) as client:
        return client.post(
            path,
            content=raw,
            headers={"content-type": "application/json", "authorization": "Bearer sk-x"},
        )


def answered(response: httpx.Response, stream: bool, says: str = "ok") -> None:
    assert response.status_code == 200, response.text[:500]
    if stream:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-300:]
        assert says in response.text
    else:
        assert says in json.dumps(response.json())


def refused(response: httpx.Response, status: int, param: str | None, code: str | None) -> str:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code), error
    assert error["type"] == "invalid_request_error"
    return str(error["message"])


def chat(bot: str, content: Any = "hi", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": bot,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        **extra,
    }


# --- the request body: poe_max_body_mb ---------------------------------------------------------

WORDS = "the quick brown fox jumps over a lazy dog while logs scroll past at night"


def body_of_size(bot: str, size: int, content: str, stream: bool) -> bytes:
    """A chat request of exactly ``size`` bytes: ``content`` cut to fit, the rest JSON spaces
    (one huge line either way: no newline anywhere)."""
    empty = json.dumps(chat(bot, "", stream), ensure_ascii=False).encode()
    room = size - len(empty)
    text_ = content.encode()[:room].decode("utf-8", "ignore")
    body = json.dumps(chat(bot, text_, stream), ensure_ascii=False).encode()
    assert len(body) <= size
    return body[:-1] + b" " * (size - len(body)) + b"}"


def words(chars: int) -> str:
    rng = random.Random(7)
    out, n = [], 0
    while n < chars:
        w = rng.choice(WORDS.split())
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


# Kept under a million characters: a longer message is another limit's case (token counting).
# The 3-byte one is ~350,000 tokens, past bpe-openai's 200,000-token limit per call: answered
# only with token counting done in pieces (H1's tokens.py, issue 13 item 1).
CONTENTS = {
    "one repeated 3-byte character": "€" * (BODY_LIMIT // 3),
    "words, then JSON whitespace": words(900_000),
    "one repeated ascii character, then JSON whitespace": "a" * 900_000,
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("content", list(CONTENTS))
@pytest.mark.parametrize("edge", list(EDGES))
def test_body_size_at_under_and_over_the_limit(
    small_body: Mitmdump, fake_poe: FakePoe, bot: str, edge: str, content: str, stream: bool
) -> None:
    fake_poe.script(bot, [text("ok")])
    body = body_of_size(bot, BODY_LIMIT + EDGES[edge], CONTENTS[content], stream)
    assert len(body) == BODY_LIMIT + EDGES[edge]
    response = post(small_body, "/v1/chat/completions", body)
    if edge == "over":
        message = refused(response, 413, None, "request_too_large")
        assert "poe_max_body_mb" in message
        assert fake_poe.requests_for(bot) == []
    else:
        answered(response, stream)
        (query,) = fake_poe.requests_for(bot)
        assert query.query is not None
        sent = json.loads(body)["messages"][0]["content"]
        assert query.query.query[-1].content == sent


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/responses", "/v1/images/generations"])
def test_body_limit_holds_on_every_endpoint(
    small_body: Mitmdump, fake_poe: FakePoe, bot: str, path: str
) -> None:
    fake_poe.script(bot, [text("ok")])
    field = {"/v1/completions": "prompt", "/v1/responses": "input"}.get(path, "prompt")
    empty = json.dumps({"model": bot, field: ""}).encode()
    for edge, delta in EDGES.items():
        size = BODY_LIMIT + delta
        body = json.dumps({"model": bot, field: "x" * (size - len(empty))}).encode()
        assert len(body) == size
        response = post(small_body, path, body)
        if edge == "over":
            refused(response, 413, None, "request_too_large")
        else:
            assert response.status_code != 413, response.text[:300]
    assert len(fake_poe.requests_for(bot)) <= 2  # only the two that fit


# --- a file: poe_max_file_mb --------------------------------------------------------------------

FILE_CONTENTS = {
    "one repeated byte": lambda n: b"\0" * n,
    "random bytes": lambda n: random.Random(n).randbytes(n),
}


def image_message(data: bytes, kind: str) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    if kind == "image_url":
        part = {"type": "image_url", "image_url": {"url": url}}
    else:
        part = {"type": "file", "file": {"filename": "blob.bin", "file_data": url}}
    return [{"type": "text", "text": "what is this?"}, part]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", ["image_url", "file"])
@pytest.mark.parametrize("content", list(FILE_CONTENTS))
@pytest.mark.parametrize("edge", list(EDGES))
def test_file_size_at_under_and_over_the_limit(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, edge: str, content: str, kind: str, stream: bool
) -> None:
    fake_poe.script(bot, [text("ok")])
    # a size whose base64 ends in padding too: the size is the file's, not its encoding's
    size = FILE_LIMIT + EDGES[edge]
    data = FILE_CONTENTS[content](size)
    uploads = len(fake_poe.uploads)
    response = post(proxy, "/v1/chat/completions", chat(bot, image_message(data, kind), stream))
    if edge == "over":
        where = "image_url.url" if kind == "image_url" else "file.file_data"
        message = refused(response, 413, f"messages[0].content[1].{where}", "file_too_large")
        assert f"{size} bytes" in message and f"at most {FILE_LIMIT} bytes" in message
        assert fake_poe.requests_for(bot) == []
        assert len(fake_poe.uploads) == uploads
    else:
        answered(response, stream)
        (query,) = fake_poe.requests_for(bot)
        assert query.query is not None and len(query.query.query[-1].attachments) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("edge", list(EDGES))
def test_responses_api_file_size_at_under_and_over(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, edge: str, stream: bool
) -> None:
    fake_poe.script(bot, [text("ok")])
    data = b"\xff" * (FILE_LIMIT + EDGES[edge])
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    content = [{"type": "input_text", "text": "what?"}, {"type": "input_image", "image_url": url}]
    body = {"model": bot, "input": [{"role": "user", "content": content}], "stream": stream}
    response = post(proxy, "/v1/responses", body)
    if edge == "over":
        assert response.status_code == 413, response.text[:300]
        assert response.json()["error"]["code"] == "file_too_large"
        assert fake_poe.requests_for(bot) == []
    else:
        assert response.status_code == 200, response.text[:300]
        assert "ok" in response.text
        assert len(fake_poe.requests_for(bot)) == 1


# --- the response store: poe_response_store_size ------------------------------------------------


def test_response_store_keeps_exactly_its_size(
    small_body: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("ok")])
    made = []
    for _ in range(STORE_SIZE + 1):
        response = post(small_body, "/v1/responses", {"model": bot, "input": "hi"})
        assert response.status_code == 200, response.text[:300]
        made.append(response.json()["id"])
    with small_body.http() as client:
        statuses = [client.get(f"/v1/responses/{i}").status_code for i in made]
    assert statuses == [404] + [200] * STORE_SIZE  # the oldest made room for the newest


# --- tool schemas and poe_parameters: depth and size (addon/bounds.py) -----------------------


def nested(depth: int, leaf: Any = "x") -> Any:
    """``depth`` levels of containers, alternating objects and arrays."""
    value = leaf
    for level in range(depth):
        value = {"a": value} if level % 2 else [value]
    return value


def schema_of_depth(depth: int) -> dict[str, Any]:
    # the parameters object is level 1, "properties" 2, the property 3
    return {"type": "object", "properties": {"p": nested(depth - 3, leaf={"type": "string"})}}


def schema_of_nodes(nodes: int) -> dict[str, Any]:
    # root, "object", properties, {} and the list: 5 values, then the list's numbers
    return {"type": "object", "properties": {"p": {}}, "enum": [0] * (nodes - 5)}


def tools_with(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    function = {"name": "f", "description": "d", "parameters": parameters}
    return [{"type": "function", "function": function}]


def count_values(value: Any) -> tuple[int, int]:
    """(values, depth) as bounds.check_bounds counts them, for the tests' own arithmetic."""
    if isinstance(value, dict):
        children = [count_values(v) for v in value.values()]
    elif isinstance(value, list):
        children = [count_values(v) for v in value]
    else:
        return 1, 0
    return 1 + sum(c[0] for c in children), 1 + max((c[1] for c in children), default=0)


BOUNDS = {
    "tool schema depth": ("tools", lambda d: schema_of_depth(MAX_DEPTH + d)),
    "tool schema size": ("tools", lambda d: schema_of_nodes(MAX_NODES + d)),
    "poe_parameters depth": ("poe_parameters", lambda d: {"p": nested(MAX_DEPTH - 1 + d)}),
    "poe_parameters size": ("poe_parameters", lambda d: {"p": [0] * (MAX_NODES - 2 + d)}),
}


def test_bound_arithmetic() -> None:
    """The values the next test sends sit exactly at the bounds."""
    assert count_values(schema_of_depth(MAX_DEPTH))[1] == MAX_DEPTH
    assert count_values(schema_of_nodes(MAX_NODES))[0] == MAX_NODES
    assert count_values({"p": nested(MAX_DEPTH - 1)})[1] == MAX_DEPTH
    assert count_values({"p": [0] * (MAX_NODES - 2)})[0] == MAX_NODES


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("bound", list(BOUNDS))
@pytest.mark.parametrize("edge", list(EDGES))
def test_structure_bounds_at_under_and_over(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, edge: str, bound: str, stream: bool
) -> None:
    fake_poe.script(bot, [text("ok")])
    field, make = BOUNDS[bound]
    value = make(EDGES[edge])
    if field == "tools":
        body = chat(bot, stream=stream, tools=tools_with(value))
        param = "tools[0].function.parameters"
    else:
        body = chat(bot, stream=stream, poe_parameters=value)
        param = "poe_parameters"
    response = post(proxy, "/v1/chat/completions", body)
    if edge == "over":
        message = refused(response, 400, param, None)
        assert ("too deeply" in message) if "depth" in bound else ("too large" in message)
        assert fake_poe.requests_for(bot) == []
    else:
        answered(response, stream)
        (query,) = fake_poe.requests_for(bot)
        if field == "tools":
            assert query.body["tools"][0]["function"]["parameters"]["properties"]


def test_refs_that_multiply_are_refused_quickly(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    # each definition names the next ten times: 10**8 values once inlined
    defs = {
        f"d{i}": {"type": "array", "items": [{"$ref": f"#/$defs/d{i + 1}"}] * 10} for i in range(8)
    }
    defs["d8"] = {"type": "string"}
    params = {"type": "object", "properties": {"p": {"$ref": "#/$defs/d0"}}, "$defs": defs}
    started = time.monotonic()
    response = post(proxy, "/v1/chat/completions", chat(bot, tools=tools_with(params)))
    assert time.monotonic() - started < 5
    refused(response, 400, "tools[0].function.parameters", None)
    assert fake_poe.requests_for(bot) == []


@pytest.mark.parametrize("depth", [500, 100_000])
def test_a_deeply_nested_body(proxy: Mitmdump, fake_poe: FakePoe, bot: str, depth: int) -> None:
    """Nesting in a field the proxy ignores is fine while Python's parser takes it; past
    that, the body is a clear 400, not a 500."""
    fake_poe.script(bot, [text("ok")])
    raw = json.dumps(chat(bot))[:-1].encode() + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    response = post(proxy, "/v1/chat/completions", raw)
    if depth < 1000:
        answered(response, stream=False)
    else:
        refused(response, 400, None, None)
        assert "too deeply" in response.json()["error"]["message"]
        assert fake_poe.requests_for(bot) == []


# --- the history: no limit but the body's ------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("content", ["", "hi", "€"])
def test_a_long_history_reaches_poe_whole(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, content: str, stream: bool
) -> None:
    fake_poe.script(bot, [text("ok")])
    turns = 5_000
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{content}{i}"}
        for i in range(turns + 1)
    ]
    response = post(
        proxy, "/v1/chat/completions", {"model": bot, "messages": messages, "stream": stream}
    )
    answered(response, stream)
    (query,) = fake_poe.requests_for(bot)
    assert query.query is not None
    assert [m.content for m in query.query.query] == [m["content"] for m in messages]


# --- n: chat choices, legacy completions, images -------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("n", [0, 1, MAX_CHOICES - 1, MAX_CHOICES, MAX_CHOICES + 1])
def test_chat_n_at_its_bounds(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, n: int, stream: bool
) -> None:
    fake_poe.script(bot, [text("ok")])
    response = post(proxy, "/v1/chat/completions", chat(bot, stream=stream, n=n))
    if not 1 <= n <= MAX_CHOICES:
        refused(response, 400, "n", None)
        assert fake_poe.requests_for(bot) == []
        return
    answered(response, stream)
    assert len(fake_poe.requests_for(bot)) == n
    if stream:
        indexes = {
            c["index"]
            for line in response.text.splitlines()
            if line.startswith("data: {")
            for c in json.loads(line[6:])["choices"]
        }
    else:
        indexes = {c["index"] for c in response.json()["choices"]}
    assert indexes == set(range(n))


@pytest.mark.parametrize(
    ("prompts", "n"), [(2, MAX_CHOICES), (20, 1), (4, 5), (1, MAX_CHOICES + 1), (21, 1), (3, 7)]
)
def test_completions_choices_at_their_bound(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, prompts: int, n: int
) -> None:
    """At most 20 choices (prompts x n) per request, and n itself at most MAX_CHOICES."""
    fake_poe.script(bot, [text("ok")])
    body = {"model": bot, "prompt": [f"p{i}" for i in range(prompts)], "n": n}
    response = post(proxy, "/v1/completions", body)
    if n > MAX_CHOICES:
        refused(response, 400, "n", None)
        assert fake_poe.requests_for(bot) == []
    elif prompts * n > 20:
        refused(response, 400, "prompt", None)
        assert fake_poe.requests_for(bot) == []
    else:
        assert response.status_code == 200, response.text[:300]
        assert len(response.json()["choices"]) == prompts * n
        assert len(fake_poe.requests_for(bot)) == prompts * n


@pytest.mark.parametrize("n", [0, 1, MAX_IMAGES, MAX_IMAGES + 1])
def test_images_n_at_its_bounds(proxy: Mitmdump, fake_poe: FakePoe, bot: str, n: int) -> None:
    url = fake_poe.host_file(f"{bot}.png", b"\x89PNG fake", "image/png")
    fake_poe.script(bot, [file(url, "image/png", "cat.png")])
    response = post(proxy, "/v1/images/generations", {"model": bot, "prompt": "a cat", "n": n})
    if not 1 <= n <= MAX_IMAGES:
        refused(response, 400, "n", None)
        assert fake_poe.requests_for(bot) == []
    else:
        assert response.status_code == 200, response.text[:300]
        assert len(response.json()["data"]) == n
        assert len(fake_poe.requests_for(bot)) == n


# --- stop: at most four sequences, as OpenAI ----------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("count", [MAX_STOP - 1, MAX_STOP, MAX_STOP + 1, 100_000])
def test_stop_sequences_at_their_bound(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, path: str, count: int, stream: bool
) -> None:
    """Each stop sequence is looked for in every piece of the answer, on the event loop all
    streams share: 10,000 of them took ~70 ms a piece, stalling every other client."""
    fake_poe.script(bot, [text("ok"), text(" then STOP here")])
    stops = [f"STOP{i}" for i in range(count - 1)] + ["STOP"]
    body: dict[str, Any] = {"model": bot, "stop": stops, "stream": stream}
    if path == "/v1/completions":
        body["prompt"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    response = post(proxy, path, body)
    if count > MAX_STOP:
        refused(response, 400, "stop", None)
        assert fake_poe.requests_for(bot) == []
    else:
        answered(response, stream, says=" then ")
        assert "here" not in response.text  # cut at the stop sequence


# --- tools: at most 128, as OpenAI ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("count", [MAX_TOOLS - 1, MAX_TOOLS, MAX_TOOLS + 1, 100_000])
def test_tool_count_at_its_bound(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, count: int, stream: bool
) -> None:
    fake_poe.script(bot, [text("ok")])
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [
        {"type": "function", "function": {"name": f"f{i}", "parameters": parameters}}
        for i in range(count)
    ]
    started = time.monotonic()
    response = post(proxy, "/v1/chat/completions", chat(bot, stream=stream, tools=tools))
    if count > MAX_TOOLS:
        refused(response, 400, "tools", None)
        assert time.monotonic() - started < 5
        assert fake_poe.requests_for(bot) == []
    else:
        answered(response, stream)
        (query,) = fake_poe.requests_for(bot)
        assert len(query.body["tools"]) == count
