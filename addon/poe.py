"""Talks to Poe: one shared httpx pool, fastapi-poe's protocol client, failures as plain data.

fastapi-poe hides HTTP statuses behind a generic BotError and retries dropped connections even
after text was yielded (which duplicates text). So: an httpx response hook recovers the status
and body of a failed query, fastapi-poe's own retry is off, and we retry only where nothing can
have been produced yet (a refused connection).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from fastapi_poe.client import BotError, BotErrorNoRetry, stream_request_base
from fastapi_poe.types import Attachment, MetaResponse, QueryRequest

from addon.errors import PoeFailure

logger = logging.getLogger(__name__)

EventKind = Literal["text", "replace", "file", "suggested", "meta", "data", "tool_calls"]


@dataclass(slots=True)
class PoeEvent:
    kind: EventKind
    text: str = ""
    attachment: Attachment | None = None
    data: dict[str, Any] | None = None
    tool_calls: list[Any] | None = field(default=None)


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
    if response.request.headers.get("accept") != "text/event-stream":
        return
    await response.aread()
    raise _HTTPStatusError(
        response.status_code, response.text[:2000], response.headers.get("retry-after")
    )


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


def _convert(message: Any) -> PoeEvent | None:
    if isinstance(message, MetaResponse):
        return PoeEvent("meta", data=dict(message.raw_response or {}))
    if message.attachment is not None:
        return PoeEvent("file", attachment=message.attachment)
    if message.is_suggested_reply:
        return PoeEvent("suggested", text=message.text)
    if message.tool_calls:
        return PoeEvent("tool_calls", tool_calls=list(message.tool_calls))
    if message.data is not None:
        return PoeEvent("data", data=message.data)
    if message.is_replace_response:
        return PoeEvent("replace", text=message.text)
    return PoeEvent("text", text=message.text)


class PoeClient:
    """One pool of connections to Poe for every request the proxy answers."""

    CONNECT_RETRIES = 1

    def __init__(self, base_url: str, proxy: str | None = None) -> None:
        self.base_url = base_url
        self.session = httpx.AsyncClient(
            # Never read HTTPS_PROXY / SSL_CERT_FILE: set for the *client's* sake they would loop
            # Poe calls back through mitmproxy or break Poe's TLS.
            trust_env=False,
            proxy=proxy,
            timeout=httpx.Timeout(connect=20, read=600, write=60, pool=None),
            # The default cap of 100 connections would queue the 101st concurrent stream.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            event_hooks={"response": [_raise_for_status]},
        )

    async def aclose(self) -> None:
        await self.session.aclose()

    async def stream(self, query: QueryRequest, bot: str, api_key: str) -> AsyncIterator[PoeEvent]:
        """Poe's events for one query; raises PoeError with the failure as data."""
        request = _QuietRepr.model_construct(**dict(query))
        for attempt in range(self.CONNECT_RETRIES + 1):
            produced = False
            try:
                async for message in stream_request_base(
                    request=request,
                    bot_name=bot,
                    api_key=api_key,
                    session=self.session,
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
                if refused and not produced and attempt < self.CONNECT_RETRIES:
                    await asyncio.sleep(0.3)
                    continue
                raise PoeError(_failure_from(exc, bot)) from None
