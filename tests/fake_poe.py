"""A stand-in Poe server that speaks the Poe bot query protocol, for tests.

The real client (``fastapi_poe.client``) talks to ``{base_url}{bot_name}`` with a JSON
``QueryRequest`` body and an ``Authorization: Bearer <key>`` header, and reads the answer as
server-sent events (``text``, ``replace_response``, ``meta``, ``suggested_reply``, ``file``,
``json``, ``error``, ``done``). It also POSTs ``report_error`` / ``report_feedback`` /
``settings`` bodies (non-query ``type``) to the same URL, and uploads attachments to
``{upload_base}file_upload_3RD_PARTY_POST`` with ``Authorization: <key>`` (no "Bearer").

Usage::

    with FakePoe() as fake:
        fake.script("GPT-4o", [text("Hello"), text(" world")])
        ...  # point the code under test at fake.base_url / fake.upload_url
        assert fake.requests_for("GPT-4o")[0].query.query[-1].content == "hi"

Each bot answers every request with its script until it is re-scripted
(``script_sequence`` plays a different script per request). After the last step a ``done``
event is sent automatically unless the script contains ``no_done()`` or ends with ``cut()``.

Protocol notes learned from fastapi-poe 0.0.83's client (they matter for code under test):

* The client never looks at the HTTP status of a query: ``httpx_sse`` raises ``SSEError``
  because a non-SSE answer lacks ``Content-Type: text/event-stream``, and
  ``stream_request_base`` wraps that in ``BotError("Error communicating with bot X")``.
  The status (401/404/429 ...) is only observable through an httpx event hook on the session.
* ``error`` events raise ``BotError`` when ``allow_retry`` is true *or missing*, and
  ``BotErrorNoRetry`` only when it is false; a ``BotError`` is retried (whole request again)
  when ``num_tries > 1``.
* A ``httpx.RemoteProtocolError`` (connection cut mid-stream) is retried even after output
  was already yielded, so with ``num_tries > 1`` the caller sees the partial text again.
* ``meta`` is honoured only as the very first event; later ones are silently ignored.
* On ``done`` with no text/replace chunk (and no tools) and on a stream that ends without
  ``done``, the client POSTs a ``report_error`` back to the bot URL (see ``reports``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import hashlib
import json
import logging
import mimetypes
import socket
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import pydantic
import uvicorn
from fastapi_poe.types import QueryRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Send

__all__ = [
    "Cut",
    "Echo",
    "Event",
    "FakePoe",
    "HttpError",
    "NoDone",
    "Raw",
    "Recorded",
    "RecordedUpload",
    "Sleep",
    "Step",
    "cut",
    "echo",
    "error",
    "file",
    "http_error",
    "json_event",
    "meta",
    "no_done",
    "raw",
    "replace",
    "sleep",
    "suggested",
    "text",
]

UPLOAD_PATH = "file_upload_3RD_PARTY_POST"
ATTACHMENT_URL_PREFIX = "https://fake-poe.test/att/"


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Event:
    """One SSE event: ``event: <event>\\ndata: <json(data)>\\n\\n``."""

    event: str
    data: Any


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class HttpError:
    """Answer with a plain HTTP error instead of an event stream (must be the first step)."""

    status: int
    body: dict[str, Any] | str
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class Cut:
    """Abort the connection without the terminating chunk (client: RemoteProtocolError)."""


@dataclass(frozen=True)
class Raw:
    """Bytes written verbatim into the SSE body."""

    data: bytes


@dataclass(frozen=True)
class NoDone:
    """Marker: do not send the automatic trailing ``done`` event."""


@dataclass(frozen=True)
class Echo:
    """A ``text`` event whose text is the content of the last message of the query."""


Step = Event | Sleep | HttpError | Cut | Raw | NoDone | Echo


def text(s: str) -> Event:
    return Event("text", {"text": s})


def replace(s: str) -> Event:
    return Event("replace_response", {"text": s})


def meta(**fields: Any) -> Event:
    return Event("meta", dict(fields))


def suggested(s: str) -> Event:
    return Event("suggested_reply", {"text": s})


def file(url: str, content_type: str, name: str, inline_ref: str | None = None) -> Event:
    data: dict[str, Any] = {"url": url, "content_type": content_type, "name": name}
    if inline_ref is not None:
        data["inline_ref"] = inline_ref
    return Event("file", data)


def json_event(obj: Any) -> Event:
    return Event("json", obj)


def error(text: str, allow_retry: bool = False, error_type: str | None = None) -> Event:
    data: dict[str, Any] = {"allow_retry": allow_retry, "text": text}
    if error_type is not None:
        data["error_type"] = error_type
    return Event("error", data)


def sleep(seconds: float) -> Sleep:
    return Sleep(seconds)


def http_error(
    status: int, body: dict[str, Any] | str, headers: dict[str, str] | None = None
) -> HttpError:
    return HttpError(status, body, headers)


def cut() -> Cut:
    return Cut()


def raw(s: str | bytes) -> Raw:
    return Raw(s.encode() if isinstance(s, str) else s)


def no_done() -> NoDone:
    return NoDone()


def echo() -> Echo:
    return Echo()


def encode_event(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _check_script(steps: list[Step]) -> list[Step]:
    steps = list(steps)
    for i, step in enumerate(steps):
        if not isinstance(step, Step):
            raise TypeError(f"not a FakePoe step: {step!r}")
        if isinstance(step, HttpError) and i != 0:
            raise ValueError("http_error() must be the first step of a script")
        if isinstance(step, Cut) and i != len(steps) - 1:
            raise ValueError("cut() must be the last step of a script")
    return steps


# --------------------------------------------------------------------------- records


@dataclass
class Recorded:
    """A query request as the fake server saw it (fields are updated while it streams)."""

    bot: str
    api_key: str
    body: dict[str, Any]
    query: QueryRequest | None
    started: float
    finished: float | None = None
    disconnected: float | None = None
    events_sent: int = 0
    invalid: bool = False
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    raw_body: bytes = field(default=b"", repr=False)
    # (host, port) of the client's TCP connection: tells whether the client reused one.
    client: tuple[str, int] | None = None

    def mark_disconnected(self) -> None:
        if self.disconnected is None and self.finished is None:
            self.disconnected = time.monotonic()


@dataclass
class RecordedUpload:
    api_key: str
    filename: str | None
    content_type: str | None
    data: bytes | None
    download_url: str | None
    status: int = 200
    attachment_url: str | None = None


class _CutConnection(Exception):
    """Raised inside the SSE generator to make uvicorn drop the connection."""


def _contains_cut(exc: BaseException | None) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _CutConnection):
            return True
        if isinstance(exc, BaseExceptionGroup):
            return any(_contains_cut(e) for e in exc.exceptions)
        exc = exc.__cause__ or exc.__context__
    return False


class _HideCutTracebacks(logging.Filter):
    """Drop uvicorn's "Exception in ASGI application" logs caused by cut()."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _contains_cut(record.exc_info[1]))


_cut_filter = _HideCutTracebacks()


class _SSEResponse(StreamingResponse):
    """StreamingResponse that notes on the record when the client goes away.

    Starlette cancels ``stream_response`` when uvicorn reports ``http.disconnect``; if the
    generator is parked at a ``yield`` at that moment it would only be closed by the garbage
    collector, so close it here to make ``Recorded.disconnected`` deterministic.
    """

    def __init__(self, gen: AsyncIterator[bytes], rec: Recorded) -> None:
        super().__init__(
            gen,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._gen = gen
        self._rec = rec

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        except _CutConnection:
            raise
        except BaseException:
            self._rec.mark_disconnected()
            raise
        finally:
            aclose = getattr(self._gen, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()


def _bearer(value: str | None) -> str:
    if value is None:
        return ""
    scheme, _, rest = value.partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else value.strip()


def _parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, str, bytes]]:
    """Parse multipart/form-data (stdlib only; python-multipart is not installed).

    Returns ``{field: (filename, content_type, payload)}``.
    """
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    out: dict[str, tuple[str | None, str, bytes]] = {}
    if not msg.is_multipart():
        return out
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        out[name] = (
            part.get_filename(),
            part.get_content_type(),
            payload if isinstance(payload, bytes) else b"",
        )
    return out


# --------------------------------------------------------------------------- server


class FakePoe:
    """A fake Poe bot-query + upload server running in a background thread."""

    def __init__(self, api_keys: Iterable[str] = ("poe-test-key",)) -> None:
        self.api_keys: frozenset[str] = frozenset(api_keys)
        self.requests: list[Recorded] = []
        self.uploads: list[RecordedUpload] = []
        self.reports: list[dict[str, Any]] = []
        self._report_bots: list[str] = []
        self._scripts: dict[str, list[list[Step]]] = {}
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._thread_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.app = Starlette(
            routes=[
                Route("/bot/{name}", self._bot_endpoint, methods=["POST"]),
                Route(f"/poe_api/{UPLOAD_PATH}", self._upload_endpoint, methods=["POST"]),
                Route("/cdn/{name}", self._cdn_endpoint, methods=["GET"]),
                Route("/v1/models", self._models_endpoint, methods=["GET"]),
            ]
        )
        # Poe's public model list (GET /v1/models): the bots it publishes, or a failure.
        self.published: list[str] = []
        self.published_status = 200
        self.published_delay = 0.0  # seconds before the list is sent
        self.model_list_fetches = 0
        self._files: dict[str, tuple[bytes, str]] = {}
        self.downloads: list[str] = []
        self.upload_delay = 0.0  # seconds each upload takes (for uploads that overlap)

    def host_file(self, name: str, data: bytes, content_type: str) -> str:
        """Serve bytes as Poe's CDN would serve a file a bot made; returns its URL."""
        self._files[name] = (data, content_type)
        return f"http://127.0.0.1:{self.port}/cdn/{name}"

    async def _cdn_endpoint(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.downloads.append(name)
        if name not in self._files:
            return Response(status_code=404)
        data, content_type = self._files[name]
        return Response(data, media_type=content_type)

    async def _models_endpoint(self, request: Request) -> Response:
        """Poe's OpenAI-compatible model list: public, no key needed."""
        self.model_list_fetches += 1
        if self.published_delay:
            await asyncio.sleep(self.published_delay)
        if self.published_status != 200:
            return JSONResponse({"error": {"message": "unavailable"}}, self.published_status)
        data = [
            {"id": name, "object": "model", "created": 1_750_000_000, "owned_by": "Poe"}
            for name in self.published
        ]
        return JSONResponse({"object": "list", "data": data})

    # ----------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakePoe is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """Bot query base URL; fastapi-poe appends the bot name."""
        return f"http://127.0.0.1:{self.port}/bot/"

    @property
    def upload_url(self) -> str:
        """``base_url`` for ``fastapi_poe.client.upload_file``."""
        return f"http://127.0.0.1:{self.port}/poe_api/"

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("FakePoe already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            http="h11",
            loop="asyncio",
            timeout_graceful_shutdown=1,
        )
        # Config() (re)configures uvicorn's loggers, so attach the filter afterwards.
        err_logger = logging.getLogger("uvicorn.error")
        if _cut_filter not in err_logger.filters:
            err_logger.addFilter(_cut_filter)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="fake-poe", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("FakePoe server thread died") from self._thread_error
            if time.monotonic() > deadline:
                raise RuntimeError("FakePoe did not start within 10 s")
            time.sleep(0.005)

    def _run(self) -> None:
        server, sock = self._server, self._sock
        assert server is not None and sock is not None

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            await server.serve(sockets=[sock])

        try:
            asyncio.run(main())
        except BaseException as exc:  # pragma: no cover - surfaced by start()
            self._thread_error = exc
            raise

    def _close_connections(self) -> None:
        """(In the server loop) drop every open connection, streaming or idle."""
        server = self._server
        if server is None:
            return
        for conn in list(server.server_state.connections):
            transport = getattr(conn, "transport", None)
            if isinstance(transport, asyncio.BaseTransport):
                transport.close()

    def stop(self) -> None:
        """Stop the server. Streams still running are cut (and marked ``disconnected``)."""
        server, thread, loop = self._server, self._thread, self._loop
        if server is None or thread is None:
            return
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._close_connections)
        server.should_exit = True
        server.force_exit = True
        thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = self._loop = None

    def __enter__(self) -> FakePoe:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- scripting

    def script(self, bot: str, steps: list[Step]) -> None:
        """Every request to ``bot`` is answered with ``steps`` (until re-scripted)."""
        checked = _check_script(steps)
        with self._lock:
            self._scripts[bot] = [checked]

    def script_sequence(self, bot: str, scripts: list[list[Step]]) -> None:
        """Request n to ``bot`` gets ``scripts[n]``; the last script repeats afterwards."""
        if not scripts:
            raise ValueError("script_sequence needs at least one script")
        checked = [_check_script(s) for s in scripts]
        with self._lock:
            self._scripts[bot] = checked

    def unscript(self, bot: str) -> None:
        with self._lock:
            self._scripts.pop(bot, None)

    def clear(self) -> None:
        """Forget all scripts and recorded traffic."""
        with self._lock:
            self._scripts.clear()
            self.requests.clear()
            self.uploads.clear()
            self.reports.clear()
            self._report_bots.clear()

    def _next_script(self, bot: str) -> list[Step] | None:
        with self._lock:
            seq = self._scripts.get(bot)
            if seq is None:
                return None
            return seq.pop(0) if len(seq) > 1 else list(seq[0])

    # ----------------------------------------------------------------- inspection

    def requests_for(self, bot: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.bot == bot]

    def reports_for(self, bot: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for b, r in zip(self._report_bots, self.reports, strict=True) if b == bot]

    def wait_for(self, pred: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if pred():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    # ----------------------------------------------------------------- handlers

    def _key_ok(self, key: str) -> bool:
        return not self.api_keys or key in self.api_keys

    async def _bot_endpoint(self, request: Request) -> Response:
        bot = request.path_params["name"]
        raw_body = await request.body()
        key = _bearer(request.headers.get("authorization"))
        try:
            parsed: Any = json.loads(raw_body)
        except ValueError:
            parsed = None
        body: dict[str, Any] = parsed if isinstance(parsed, dict) else {}

        if "type" in body and body["type"] != "query":
            # report_error / report_feedback / report_reaction / settings
            if not self._key_ok(key):
                return JSONResponse({"detail": "Invalid API key"}, status_code=401)
            with self._lock:
                self.reports.append(body)
                self._report_bots.append(bot)
            return JSONResponse({})

        rec = Recorded(
            bot=bot,
            api_key=key,
            body=body,
            query=None,
            started=time.monotonic(),
            headers=dict(request.headers),
            raw_body=raw_body,
            client=(request.client.host, request.client.port) if request.client else None,
        )
        with self._lock:
            self.requests.append(rec)

        def answer(status: int, payload: dict[str, Any]) -> Response:
            rec.status = status
            rec.finished = time.monotonic()
            return JSONResponse(payload, status_code=status)

        if not self._key_ok(key):
            return answer(401, {"detail": "Invalid API key"})
        try:
            rec.query = QueryRequest.model_validate(parsed)
        except pydantic.ValidationError as exc:
            rec.invalid = True
            return answer(400, {"detail": json.loads(exc.json(include_url=False))})

        steps = self._next_script(bot)
        if steps is None:
            # Assumption: Poe answers an unknown bot name with a plain 404 JSON error
            # (not an SSE error event). Not verified against the live service.
            return answer(404, {"detail": "Bot not found"})

        if steps and isinstance(steps[0], HttpError):
            step = steps[0]
            rec.status = step.status
            rec.finished = time.monotonic()
            if isinstance(step.body, str):
                return PlainTextResponse(step.body, step.status, headers=step.headers)
            return JSONResponse(step.body, step.status, headers=step.headers)

        return _SSEResponse(self._play(rec, steps), rec)

    async def _play(self, rec: Recorded, steps: list[Step]) -> AsyncIterator[bytes]:
        send_done = not any(isinstance(s, NoDone) for s in steps)
        try:
            for step in steps:
                match step:
                    case Event(event=event, data=data):
                        yield encode_event(event, data)
                        rec.events_sent += 1
                    case Echo():
                        messages = rec.query.query if rec.query is not None else []
                        content = messages[-1].content if messages else ""
                        yield encode_event("text", {"text": content})
                        rec.events_sent += 1
                    case Sleep(seconds=seconds):
                        await asyncio.sleep(seconds)
                    case Raw(data=data):
                        yield data
                    case Cut():
                        raise _CutConnection("cut() step")
                    case NoDone() | HttpError():
                        pass
            if send_done:
                yield encode_event("done", {})
                rec.events_sent += 1
        except (GeneratorExit, asyncio.CancelledError):
            rec.mark_disconnected()
            raise
        rec.finished = time.monotonic()

    async def _upload_endpoint(self, request: Request) -> Response:
        key = request.headers.get("authorization", "")
        content_type = request.headers.get("content-type", "")
        raw_body = await request.body()

        filename: str | None = None
        part_type: str | None = None
        data: bytes | None = None
        download_url: str | None = None
        if content_type.startswith("multipart/form-data"):
            parts = _parse_multipart(content_type, raw_body)
            if "file" in parts:
                filename, part_type, data = parts["file"]
            for name in ("download_url", "download_filename"):
                if name in parts:
                    value = parts[name][2].decode()
                    if name == "download_url":
                        download_url = value
                    else:
                        filename = filename or value
        elif content_type.startswith("application/x-www-form-urlencoded"):
            form = urllib.parse.parse_qs(raw_body.decode(), keep_blank_values=True)
            download_url = form.get("download_url", [None])[0]
            filename = form.get("download_filename", [None])[0]

        rec = RecordedUpload(
            api_key=key,
            filename=filename,
            content_type=part_type,
            data=data,
            download_url=download_url,
        )
        with self._lock:
            self.uploads.append(rec)
        if self.upload_delay:
            await asyncio.sleep(self.upload_delay)

        if not self._key_ok(key):
            rec.status = 401
            return JSONResponse({"detail": "Invalid API key"}, status_code=401)
        if data is None and download_url is None:
            rec.status = 400
            return JSONResponse({"detail": "Provide file or download_url"}, status_code=400)

        if data is not None:
            digest = hashlib.sha256(data).hexdigest()[:16]
            mime = part_type or "application/octet-stream"
        else:
            assert download_url is not None
            digest = hashlib.sha256(download_url.encode()).hexdigest()[:16]
            url_path = urllib.parse.urlsplit(download_url).path
            filename = filename or url_path.rsplit("/", 1)[-1] or None
            mime = mimetypes.guess_type(url_path)[0] or "application/octet-stream"
            rec.content_type = mime
        name = filename or "file"
        rec.attachment_url = f"{ATTACHMENT_URL_PREFIX}{digest}/{urllib.parse.quote(name)}"
        return JSONResponse({"attachment_url": rec.attachment_url, "mime_type": mime})
