"""Answers a request by calling the ASGI app in-process: no socket, no second HTTP parse.

mitmproxy streams only bytes that arrive over a server connection, so streamed answers take the
loopback hop (server.py). An answer that goes out in one piece needs no connection: the addon's
`request` hook calls the same app here and sets the collected response on the flow.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from mitmproxy import http
from mitmproxy.net.http.status_codes import RESPONSES
from starlette.types import ASGIApp, Message

# `"stream": true` as a JSON member (not inside a string, where its quotes are escaped). A body
# that spells the key with escapes is not matched: its SSE answer is then sent in one piece,
# the same bytes, only not live.
_STREAMED = re.compile(rb'(?<!\\)"stream"\s*:\s*true')
# How often a waiting hook looks at the client's connection: mitmproxy defers the `error` hook
# while a hook runs, so a client that leaves is noticed here (HTTP/1: the socket's state).
WATCH_INTERVAL_S = 0.05


def needs_stream(request: http.Request) -> bool:
    """Whether the answer may stream (and so must take the loopback hop)."""
    if request.stream or request.http_version not in ("HTTP/1.1", "HTTP/1.0"):
        # A body streamed to the app (stream_large_bodies, or unknown size) is judged there
        # while it arrives. HTTP/2 and 3 say nothing while a hook runs when the client resets
        # one stream: over the hop the reset reaches the `error` hook at once.
        return True
    if request.method != "POST":
        return False
    return _STREAMED.search(request.raw_content or b"") is not None


def scope(request: http.Request, server: tuple[str, int]) -> dict[str, Any]:
    """The ASGI scope uvicorn would build for this request arriving over the hop."""
    raw_path, _, query = request.path.encode("ascii", "surrogateescape").partition(b"?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": request.http_version.removeprefix("HTTP/"),
        "method": request.method,
        "scheme": "http",
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": [(name.lower(), value) for name, value in request.headers.fields],
        "client": ("127.0.0.1", 0),
        "server": server,
    }


async def answer(
    app: ASGIApp,
    request: http.Request,
    server: tuple[str, int],
    client_left: Callable[[], bool],
    on_client_left: Callable[[], None],
) -> http.Response:
    """Call the app for ``request`` and collect its response. While it runs, ``client_left``
    is polled; once it says so, ``on_client_left`` runs (it cancels the Poe query) and the
    app's own answer to that (499) is returned."""
    body = request.raw_content or b""
    sent_body = False
    finished = asyncio.Event()
    start: Message | None = None
    chunks: list[bytes] = []

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                finished.set()

    task = asyncio.ensure_future(app(scope(request, server), receive, send))
    try:
        left = False
        while not task.done():
            await asyncio.wait((task,), timeout=WATCH_INTERVAL_S)
            if not left and not task.done() and client_left():
                left = True
                on_client_left()
        task.result()
    finally:
        finished.set()
        if not task.done():
            task.cancel()  # this hook was cancelled (mitmproxy shutting down)
    if start is None:
        raise RuntimeError("the app returned without a response")
    return response(start, b"".join(chunks), request.method == "HEAD")


def response(start: Message, content: bytes, head: bool) -> http.Response:
    headers = http.Headers(list(start.get("headers", [])))
    status = int(start["status"])
    if "content-length" not in headers and status >= 200 and status not in (204, 304):
        # uvicorn would have sent it chunked; one piece is framed by its length
        headers.pop("transfer-encoding", None)
        headers["content-length"] = str(len(content))
    now = time.time()  # (mitmproxy sets both again as it sends the response)
    return http.Response(
        http_version=b"HTTP/1.1",
        status_code=status,
        reason=RESPONSES.get(status, "").encode(),
        headers=headers,
        content=b"" if head else content,
        trailers=None,
        timestamp_start=now,
        timestamp_end=now,
    )
