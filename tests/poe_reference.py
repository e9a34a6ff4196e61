"""A second stand-in Poe server, made of fastapi-poe's own server half (``make_app``, ``PoeBot``).

``tests/fake_poe.py`` replays what this project thinks the protocol is; this one answers with
the library Poe publishes for bot servers, so every event is serialised the way a real bot
server serialises it: ``\\r\\n`` line ends, ``: ping`` comments (every ``PING_SECONDS`` here,
before the first event too), ``meta`` with all four keys, ``done`` after ``error``,
``"inline_ref": null``, an empty ``text`` after an attachment, a ``file`` event with an
``inline_ref`` before the text that refers to it, 401 ``{"detail": "Invalid access key"}``
with ``WWW-Authenticate`` for a wrong key, 404 ``{"detail": "Not Found"}`` for an unknown bot.

It offers FakePoe's scripting interface (``script``, ``script_sequence``, ``requests_for``,
``uploads``, ``host_file`` ...; it is a FakePoe with another app), so the end-to-end suites run
against both. Each scripted bot name becomes a ``PoeBot`` at ``/bot/<name>`` (added to the
running app on first use), and each step becomes the library's own response object:

* ``text`` / ``replace`` / ``suggested`` -> ``PartialResponse`` (``is_replace_response``,
  ``is_suggested_reply``); ``meta`` -> ``MetaResponse``; ``error`` -> ``ErrorResponse`` (the
  library accepts only its four ``error_type`` values); an ``Event("data", {"metadata": s})``
  -> ``DataResponse``; ``echo`` -> the last message's text;
* ``file`` without ``inline_ref`` -> ``PartialResponse(attachment=...)`` (the library sends the
  ``file`` event, then an empty ``text``); with one -> ``post_message_attachment(is_inline=True)``
  through a local upload route (``/bot_files/``). The library makes up its own ``inline_ref``;
  later text is rewritten from the scripted reference to it, so scripts read the same;
* ``json_event`` (tool-call chunks) -> a raw ``ServerSentEvent(event="json")``: the library's
  typed responses cannot carry tool calls (``handle_query`` drops ``PartialResponse.data`` and
  ``tool_calls``), so a bot server that calls tools yields these raw chunks itself;
* ``sleep`` -> ``asyncio.sleep``: a silent bot (the library keeps pinging meanwhile);
* ``fail(message)`` (only here): the bot raises; the library answers with its own error event
  (``raw_response``, ``allow_retry: false``) and ``done``;
* ``parsed_query()`` (only here): answers with the ``QueryRequest`` the library parsed, as JSON.

The library always ends with ``done`` and answers with an event stream, so ``http_error``,
``cut``, ``raw`` and ``no_done`` (fault injection) exist only in FakePoe: scripting one here
raises ``CannotPlay``; such tests run against FakePoe only (``fake_poe_only`` in conftest).
One ``PoeBot`` checks one access key, so each key has its own bot server (``make_app``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from typing import Any

import fastapi_poe.base
from fake_poe import (
    UPLOAD_PATH,
    Cut,
    Echo,
    Event,
    FakePoe,
    HttpError,
    NoDone,
    Raw,
    Recorded,
    Sleep,
)
from fastapi import FastAPI
from fastapi_poe import (
    Attachment,
    DataResponse,
    ErrorResponse,
    MetaResponse,
    PartialResponse,
    PoeBot,
    QueryRequest,
    make_app,
)
from fastapi_poe.types import ReportErrorRequest, RequestContext
from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "PING_SECONDS",
    "CannotPlay",
    "Fail",
    "ParsedQuery",
    "PoeReference",
    "fail",
    "parsed_query",
]

PING_SECONDS = 0.2  # sse-starlette's default is 15 s: short, so that tests see pings


class _ShortPings(EventSourceResponse):
    DEFAULT_PING_INTERVAL = PING_SECONDS  # type: ignore[assignment]


# make_app builds its streams with the EventSourceResponse it imported: this is the one setting
# it does not expose. Only the bot server in this (test) process uses it.
fastapi_poe.base.EventSourceResponse = _ShortPings  # type: ignore[misc]


@dataclass(frozen=True)
class Fail:
    """The bot raises this message (the library turns it into an error event)."""

    message: str


@dataclass(frozen=True)
class ParsedQuery:
    """A ``text`` with the ``QueryRequest`` the library parsed, as JSON."""


def fail(message: str = "the bot broke") -> Fail:
    return Fail(message)


def parsed_query() -> ParsedQuery:
    return ParsedQuery()


class CannotPlay(ValueError):
    """A FakePoe step fastapi-poe's server cannot produce (fault injection)."""


_FAULTS = {HttpError: "http_error()", Cut: "cut()", Raw: "raw()", NoDone: "no_done()"}
BOT_FILES = "bot_files"  # the upload route post_message_attachment uploads to


def _check(steps: Iterable[Any]) -> list[Any]:
    steps = list(steps)
    for step in steps:
        for kind, name in _FAULTS.items():
            if isinstance(step, kind):
                raise CannotPlay(
                    f"fastapi-poe's bot server cannot send {name} (it always answers with an "
                    "event stream that ends with done): mark the test "
                    '@pytest.mark.fake_poe_only(reason="...")'
                )
        if not isinstance(step, Event | Sleep | Echo | Fail | ParsedQuery):
            raise TypeError(f"not a step: {step!r}")
    return steps


class ScriptedBot(PoeBot):
    """A Poe bot server that plays its name's script with the library's response objects."""

    def __init__(self, stand_in: PoeReference, name: str, access_key: str | None) -> None:
        self.stand_in = stand_in
        self.name = name
        self.path = f"/bot/{name}"
        self.access_key = access_key or None  # None: any key (FakePoe without api_keys)
        # Show the bot the query as it arrived (the default would add attachment messages).
        self.should_insert_attachment_messages = False
        self.__post_init__()

    async def on_error(self, error_request: ReportErrorRequest) -> None:
        """fastapi-poe's client reports what it could not use (an unknown event, no text)."""
        report = error_request.model_dump(mode="json")
        with self.stand_in._lock:
            self.stand_in.reports.append(report)
            self.stand_in._report_bots.append(self.name)

    async def get_response_with_context(
        self, request: QueryRequest, context: RequestContext
    ) -> AsyncIterable[PartialResponse | ServerSentEvent | DataResponse]:
        http: Request = context.http_request
        body = await http.json()  # read (and cached) by make_app's route already
        rec = Recorded(
            bot=self.name,
            # make_app puts the bot's own key in the query: the client's is in the header.
            api_key=http.headers.get("authorization", "").removeprefix("Bearer "),
            body={k: v for k, v in body.items() if k != "http_request"},
            query=request,
            started=time.monotonic(),
            headers=dict(http.headers),
            raw_body=await http.body(),
            client=(http.client.host, http.client.port) if http.client else None,
        )
        with self.stand_in._lock:
            self.stand_in.requests.append(rec)
        steps = self.stand_in._next_script(self.name)
        try:
            async for item in self._play(request, steps):
                yield item
                rec.events_sent += 1
        except (GeneratorExit, asyncio.CancelledError):
            rec.mark_disconnected()
            raise
        rec.finished = time.monotonic()

    async def _play(
        self, request: QueryRequest, steps: list[Any] | None
    ) -> AsyncIterable[PartialResponse | ServerSentEvent | DataResponse]:
        if steps is None:
            yield ErrorResponse(text=f"{self.name} has no script", allow_retry=False)
            return
        refs: dict[str, str] = {}  # scripted inline_ref -> the library's

        def as_sent(text: str) -> str:
            for scripted, real in refs.items():
                text = text.replace(scripted, real)
            return text

        for step in steps:
            match step:
                case Sleep(seconds=seconds):
                    await asyncio.sleep(seconds)
                case Echo():
                    yield PartialResponse(text=request.query[-1].content if request.query else "")
                case Fail(message=message):
                    raise RuntimeError(message)
                case ParsedQuery():
                    yield PartialResponse(text=request.model_dump_json())
                case Event(event="text", data=data):
                    yield PartialResponse(text=as_sent(data["text"]))
                case Event(event="replace_response", data=data):
                    yield PartialResponse(text=as_sent(data["text"]), is_replace_response=True)
                case Event(event="suggested_reply", data=data):
                    yield PartialResponse(text=data["text"], is_suggested_reply=True)
                case Event(event="meta", data=data):
                    yield MetaResponse(text="", **data)
                case Event(event="error", data=data):
                    yield ErrorResponse(**data)
                case Event(event="data", data=data):
                    yield DataResponse(**data)
                case Event(event="json", data=data):
                    yield ServerSentEvent(event="json", data=json.dumps(data))
                case Event(event="file", data=data) if data.get("inline_ref"):
                    self.stand_in._bot_file_types[data["url"]] = data["content_type"]
                    uploaded = await self.post_message_attachment(
                        message_id=request.message_id,
                        download_url=data["url"],
                        download_filename=data["name"],
                        is_inline=True,
                        base_url=self.stand_in.bot_files_url,
                    )
                    assert uploaded.inline_ref is not None
                    refs[data["inline_ref"]] = uploaded.inline_ref
                case Event(event="file", data=data):
                    yield PartialResponse(text="", attachment=Attachment(**data))
                case Event(event=event, data=data):
                    yield ServerSentEvent(event=event, data=json.dumps(data))


class _HideSyncWarning(logging.Filter):
    """make_app warns, per bot, that bots without a name are not synced with poe.com."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Bot name or access key is not set" not in message and "*** Warning" not in message


logging.getLogger("uvicorn.default").addFilter(_HideSyncWarning())


class _ByKey:
    """The ASGI app: bot queries to the bot server of their key, the rest to the services."""

    def __init__(self, stand_in: PoeReference) -> None:
        self.stand_in = stand_in

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ref = self.stand_in
        if scope["type"] != "http" or not scope["path"].startswith("/bot/"):
            return await ref.services(scope, receive, send)
        key = Headers(scope=scope).get("authorization", "").removeprefix("Bearer ")
        server = ref.bot_servers.get(key, ref.bot_servers[ref.access_keys[0]])
        await server(scope, receive, send)


class PoeReference(FakePoe):
    """FakePoe's interface, answered by fastapi-poe's bot server (see the module docstring)."""

    def __init__(self, api_keys: Iterable[str] = ("poe-test-key",)) -> None:
        super().__init__(api_keys)
        # One PoeBot checks one access key: one bot server per key, and requests go to the one
        # of their key (an unknown key to the first, which refuses it), as Poe's would.
        self.access_keys = list(api_keys) or [""]
        self.bot_servers = {key: FastAPI() for key in self.access_keys}
        self._bots: set[str] = set()
        self._bots_lock = threading.Lock()
        self._bot_file_types: dict[str, str] = {}
        # Poe's own services beside the bots: file uploads, files bots made, and the upload a
        # bot's post_message_attachment does (which keeps the bot's URL).
        self.services = Starlette(
            routes=[
                Route(f"/poe_api/{UPLOAD_PATH}", self._upload_endpoint, methods=["POST"]),
                Route("/cdn/{name}", self._cdn_endpoint, methods=["GET"]),
                Route("/v1/models", self._models_endpoint, methods=["GET"]),
                Route(f"/{BOT_FILES}/{UPLOAD_PATH}", self._bot_file_endpoint, methods=["POST"]),
            ]
        )
        self.app = _ByKey(self)  # type: ignore[assignment]

    @property
    def bot_files_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{BOT_FILES}/"

    def _add_bot(self, name: str) -> None:
        with self._bots_lock:
            if name in self._bots:
                return
            self._bots.add(name)
            for key, server in self.bot_servers.items():
                make_app(ScriptedBot(self, name, key), app=server, allow_without_key=True)

    def script(self, bot: str, steps: list[Any]) -> None:  # type: ignore[override]
        checked = _check(steps)
        self._add_bot(bot)
        with self._lock:
            self._scripts[bot] = [checked]

    def script_sequence(self, bot: str, scripts: list[list[Any]]) -> None:  # type: ignore[override]
        if not scripts:
            raise ValueError("script_sequence needs at least one script")
        checked = [_check(s) for s in scripts]
        self._add_bot(bot)
        with self._lock:
            self._scripts[bot] = checked

    async def _bot_file_endpoint(self, request: Request) -> Response:
        form = urllib.parse.parse_qs((await request.body()).decode())
        url = form.get("download_url", [""])[0]
        if request.headers.get("authorization") not in self.access_keys:
            return JSONResponse({"detail": "Invalid API key"}, status_code=401)
        content_type = self._bot_file_types.get(url, "application/octet-stream")
        return JSONResponse({"attachment_url": url, "mime_type": content_type})
