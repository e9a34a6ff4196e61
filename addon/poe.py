"""Talks to Poe: one shared httpx pool, fastapi-poe's protocol client, failures as plain data.

fastapi-poe hides HTTP statuses behind a generic BotError and retries dropped connections even
after text was yielded (which duplicates text). So: an httpx response hook recovers the status
and body of a failed query, fastapi-poe's own retry is off, and we retry only where nothing can
have been produced yet (a refused connection, or a reused one that the server closed before it
answered). Connections are reused across queries (reuse.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from fastapi_poe.client import (
    AttachmentUploadError,
    BotError,
    BotErrorNoRetry,
    stream_request_base,
    upload_file,
)
from fastapi_poe.types import Attachment, MetaResponse, QueryRequest

from addon.config import secret_digest
from addon.errors import OpenAIError, PoeFailure
from addon.files import FileInput
from addon.reuse import FinishAfterDone
from addon.state import State, Unavailable

logger = logging.getLogger(__name__)
# httpx logs every request line at INFO; the addon logs one line per answered call instead.
logging.getLogger("httpx").setLevel(logging.WARNING)
# mitmproxy sets the root logger to DEBUG: httpcore would then make ~12 records per Poe query,
# each formatted and passed to every addon's log hook (a quarter of the CPU per request).
logging.getLogger("httpcore").setLevel(logging.WARNING)

EventKind = Literal["text", "replace", "file", "suggested", "meta", "data"]


@dataclass(slots=True)
class PoeEvent:
    kind: EventKind
    text: str = ""
    attachment: Attachment | None = None
    data: dict[str, Any] | None = None


class PoeError(Exception):
    def __init__(self, failure: PoeFailure) -> None:
        super().__init__(failure)
        self.failure = failure


class _HTTPStatusError(BotErrorNoRetry):
    """Raised from the response hook; a BotErrorNoRetry so fastapi-poe does not retry it."""

    def __init__(self, status: int, body: str, retry_after: str | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body
        self.retry_after = retry_after


class _QuietRepr(QueryRequest):
    # fastapi-poe builds repr(request) (the whole conversation) for every event it yields.
    def __repr__(self) -> str:
        return f"QueryRequest(message_id={self.message_id!r})"


async def _raise_for_status(response: httpx.Response) -> None:
    # Only the query itself streams events; report_error and friends must not raise here.
    if response.status_code < 400:
        return
    if not _is_query(response):
        return
    await response.aread()
    raise _HTTPStatusError(
        response.status_code, response.text[:2000], response.headers.get("retry-after")
    )


def _is_query(response: httpx.Response) -> bool:
    return response.request.headers.get("accept") == "text/event-stream"


def _log_poe_error(exc: Exception, message: str) -> None:
    logger.debug("fastapi-poe: %s: %r", message, exc)


def _failure_from(exc: BaseException, bot: str) -> PoeFailure:
    if isinstance(exc, _HTTPStatusError):
        return PoeFailure(bot, status=exc.status, body=exc.body, retry_after=exc.retry_after)
    if isinstance(exc, BotError):
        cause = exc.__cause__
        if isinstance(cause, _HTTPStatusError):
            return _failure_from(cause, bot)
        if isinstance(cause, httpx.HTTPError):
            return PoeFailure(bot, transport=_describe_transport(cause))
        try:
            event = json.loads(str(exc))
        except ValueError:
            event = None
        if isinstance(event, dict):
            return PoeFailure(bot, event=event)
        # fastapi-poe's own protocol complaints ("Invalid JSON in 'text' event" ...)
        return PoeFailure(bot, transport=f"malformed answer from Poe ({exc})")
    if isinstance(exc, httpx.HTTPError):
        return PoeFailure(bot, transport=_describe_transport(exc))
    return PoeFailure(bot, transport=f"{type(exc).__name__}: {exc}")


def _describe_transport(exc: httpx.HTTPError) -> str:
    kind = type(exc).__name__
    text = str(exc)
    return f"{kind}: {text}" if text else kind


def image_fetch_failed(url: str, why: str) -> OpenAIError:
    """The bot made its image (and Poe charged for it), but fetching it from Poe's file
    host failed: say that, not that Poe could not be reached."""
    host = httpx.URL(url).host if url.startswith(("https://", "http://")) else url[:100]
    return OpenAIError(
        502,
        f"The bot made the image, but fetching it from {host} failed: {why}. "
        "response_format=url returns its link instead.",
        "server_error",
        "image_fetch_failed",
    )


def _convert(message: Any) -> PoeEvent | None:
    if isinstance(message, MetaResponse):
        return PoeEvent("meta", data=dict(message.raw_response or {}))
    if message.attachment is not None:
        return PoeEvent("file", attachment=message.attachment)
    if message.is_suggested_reply:
        return PoeEvent("suggested", text=message.text)
    if message.data is not None:
        return PoeEvent("data", data=message.data)
    if message.is_replace_response:
        return PoeEvent("replace", text=message.text)
    return PoeEvent("text", text=message.text)


@dataclass(slots=True)
class _SharedUpload:
    task: asyncio.Task[Attachment]
    waiters: int = 0  # requests waiting for it


class PoeClient:
    """One pool of connections to Poe for every request the proxy answers."""

    CONNECT_RETRIES = 1
    UPLOAD_CACHE_SIZE = 512
    POOLS = 8
    MAX_DOWNLOAD = 50 * 1024 * 1024

    def __init__(
        self,
        base_url: str,
        proxy: str | None = None,
        upload_url: str = "https://www.quora.com/poe_api/",
    ) -> None:
        self.base_url = base_url
        self.upload_url = upload_url
        self.proxy = proxy
        # Clients resend the whole history every turn: upload the same bytes (or URL) once.
        # By (key digest, content digest): see upload.
        self._uploaded: OrderedDict[tuple[str, str], Attachment] = OrderedDict()
        self._uploading: dict[tuple[str, str], _SharedUpload] = {}
        # The deployment's uploads (poe_state_url), asked after this cache: set by Service.
        self.shared: State | None = None
        self._finishing: set[asyncio.Task[None]] = set()  # bodies read to the end after done
        # Queries whose response headers arrived (a failure after that is never resent).
        self._answered: weakref.WeakSet[httpx.Request] = weakref.WeakSet()
        # Several pools, each query on the least busy: httpcore's pool walks all its
        # connections (polling each idle socket) on every request start and end, which at 64
        # concurrent streams was ~11% of mitmdump's CPU (bench/run.py --profile). Ties go to
        # the first pool, so one query at a time keeps reusing one connection.
        self.sessions = [self._new_session(proxy) for _ in range(self.POOLS)]
        self._busy: dict[httpx.AsyncClient, int] = {}

    def _new_session(self, proxy: str | None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            # Never read HTTPS_PROXY / SSL_CERT_FILE: set for the *client's* sake they would loop
            # Poe calls back through mitmproxy or break Poe's TLS.
            trust_env=False,
            proxy=proxy,
            timeout=httpx.Timeout(connect=20, read=600, write=60, pool=None),
            # The default cap of 100 connections would queue the 101st concurrent stream.
            # 8 idle connections kept per pool: 64 in all, as the single pool kept before.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=8),
            # _reuse_connection first: it notes that Poe answered, even with an error status.
            event_hooks={"response": [self._reuse_connection, _raise_for_status]},
        )

    @contextlib.contextmanager
    def _least_busy(self) -> Iterator[httpx.AsyncClient]:
        session = min(self.sessions, key=lambda s: self._busy.get(s, 0))
        self._busy[session] = self._busy.get(session, 0) + 1
        try:
            yield session
        finally:
            self._busy[session] -= 1

    async def _reuse_connection(self, response: httpx.Response) -> None:
        if _is_query(response):
            self._answered.add(response.request)
            if response.status_code < 400:
                response.stream = FinishAfterDone(response.stream, self._finishing)

    async def aclose(self) -> None:
        for task in list(self._finishing):
            task.cancel()
        await asyncio.gather(*self._finishing, return_exceptions=True)
        for session in self.sessions:
            await session.aclose()

    async def stream(self, query: QueryRequest, bot: str, api_key: str) -> AsyncIterator[PoeEvent]:
        """Poe's events for one query; raises PoeError with the failure as data."""
        request = _QuietRepr.model_construct(**dict(query))
        with self._least_busy() as session:
            for attempt in range(self.CONNECT_RETRIES + 1):
                produced = False
                try:
                    async for message in stream_request_base(
                        request=request,
                        bot_name=bot,
                        api_key=api_key,
                        # Passed as well as set on the query: fastapi-poe then skips its
                        # "no text in response" report after an answer made only of tool calls.
                        tools=query.tools,
                        tool_calls=query.tool_calls,
                        tool_results=query.tool_results,
                        session=session,
                        on_error=_log_poe_error,
                        num_tries=1,
                        base_url=self.base_url,
                    ):
                        event = _convert(message)
                        if event is not None:
                            produced = True
                            yield event
                    return
                except (BotError, httpx.HTTPError) as exc:
                    cause = exc.__cause__ if isinstance(exc, BotError) else exc
                    refused = isinstance(cause, (httpx.ConnectError, httpx.ConnectTimeout))
                    if not produced and attempt < self.CONNECT_RETRIES:
                        if refused:
                            await asyncio.sleep(0.3)
                            continue
                        if self._unanswered(cause):
                            continue
                    raise PoeError(_failure_from(exc, bot)) from None

    def _unanswered(self, exc: BaseException | None) -> bool:
        """A query lost before Poe's response headers: on a reused connection, the server
        closing it (idle too long) just as the query went out. Nothing ran, so it is resent."""
        if not isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)):
            return False
        try:
            request = exc.request
        except RuntimeError:  # no request attached: not a query we sent
            return False
        return request not in self._answered

    async def upload(self, file: FileInput, api_key: str) -> Attachment:
        """Hand a picture or file to Poe once per key; later requests with that key reuse the
        attachment. Shared only between callers with the same key (another key may be
        rejected where this one is not), and run in a task of its own, so that one caller
        leaving never cancels another's wait; the last one leaving stops it."""
        scope = (secret_digest(api_key), file.digest)
        cached = self._uploaded.get(scope)
        if cached is not None:
            self._uploaded.move_to_end(scope)
            return cached
        if self.shared is not None:  # uploaded by another instance?
            with contextlib.suppress(Unavailable):  # (logged by the state; upload here)
                found = await self.shared.get_upload(scope)
                if found is not None:
                    attachment = Attachment.model_validate_json(found)
                    self._remember(scope, attachment)
                    return attachment
        shared = self._uploading.get(scope)
        if shared is None or shared.task.done():  # (done: it ended before it was filed)
            task = asyncio.get_running_loop().create_task(self._upload_once(scope, file, api_key))
            # retrieved: no "never retrieved" warning when every caller left as it failed
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            shared = self._uploading[scope] = _SharedUpload(task)
        shared.waiters += 1
        try:
            return await asyncio.shield(shared.task)
        finally:
            shared.waiters -= 1
            if shared.waiters == 0 and not shared.task.done():
                shared.task.cancel()  # nobody wants it any more

    async def _upload_once(
        self, scope: tuple[str, str], file: FileInput, api_key: str
    ) -> Attachment:
        try:
            attachment = await self._upload(file, api_key)
        finally:
            shared = self._uploading.get(scope)
            if shared is not None and shared.task is asyncio.current_task():
                del self._uploading[scope]
        self._remember(scope, attachment)
        if self.shared is not None:
            with contextlib.suppress(Unavailable):
                await self.shared.put_upload(scope, attachment.model_dump_json())
        return attachment

    def _remember(self, scope: tuple[str, str], attachment: Attachment) -> None:
        self._uploaded[scope] = attachment
        while len(self._uploaded) > self.UPLOAD_CACHE_SIZE:
            self._uploaded.popitem(last=False)

    async def _upload(self, file: FileInput, api_key: str) -> Attachment:
        # upload_file closes the session it is given, so each upload gets its own, with the
        # same rules as the shared one (no environment proxy or CA settings).
        session = httpx.AsyncClient(trust_env=False, proxy=self.proxy, timeout=120)
        try:
            attachment = await upload_file(
                file=file.data,
                file_url=file.url,
                file_name=file.name,
                api_key=api_key,
                session=session,
                on_error=_log_poe_error,
                num_tries=1,
                base_url=self.upload_url,
            )
        except AttachmentUploadError as e:
            match = re.match(r"(\d{3}) [^:]*: ?(.*)", str(e), re.S)
            status = int(match.group(1)) if match else 502
            body = match.group(2) if match else str(e)
            raise PoeError(PoeFailure(file.name, status=status, body=body, upload=True)) from None
        except httpx.HTTPError as e:
            raise PoeError(
                PoeFailure(file.name, transport=_describe_transport(e), upload=True)
            ) from None
        finally:
            await session.aclose()
        if file.url is None and attachment.content_type in ("", "application/octet-stream"):
            attachment = attachment.model_copy(update={"content_type": file.mime})
        return attachment

    async def download(self, url: str) -> bytes:
        """Fetch a file a bot produced (Poe's own CDN), for answers that want bytes.
        Raises OpenAIError naming what failed: Poe answered; its file could not be fetched."""
        if not url.startswith(("https://", "http://")):
            raise image_fetch_failed(url, "it has no http(s) URL")
        try:
            async with self.sessions[0].stream("GET", url) as response:
                if response.status_code >= 400:
                    raise image_fetch_failed(url, f"HTTP {response.status_code}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > self.MAX_DOWNLOAD:
                        limit = self.MAX_DOWNLOAD // (1024 * 1024)
                        raise image_fetch_failed(url, f"it is larger than {limit} MB")
                return bytes(data)
        except httpx.HTTPError as e:
            raise image_fetch_failed(url, _describe_transport(e)) from None
