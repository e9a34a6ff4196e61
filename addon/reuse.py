"""Lets Poe connections be reused although fastapi-poe stops reading at the ``done`` event.

fastapi-poe returns as soon as it parses ``done``, before httpx has read the end of the body
(the chunked terminator, usually already on its way). httpx then closes a connection whose
response is unfinished, so every query would open a new TCP (and TLS) connection to Poe.
``FinishAfterDone`` wraps a query's body: when it is closed right after ``done``, it reads the
rest in the background, bounded in time and bytes, and only then releases the connection to the
pool. The answer never waits for this; a body closed anywhere else (an error, a client that
left) is closed at once, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import httpx

# An SSE "done" line at the start of a line (a JSON data line cannot hold a raw newline).
DONE_LINE = re.compile(rb"(?:^|\n)event: ?done\r?\n")
TAIL = 128  # bytes kept from the end of what was read: enough for "event: done" + its data


class FinishAfterDone(httpx.AsyncByteStream):
    """A response body that finishes reading in the background if closed after ``done``."""

    DRAIN_S = 2.0  # a server that keeps the body open after done is given up on after this
    DRAIN_BYTES = 64 * 1024  # ... or after this much more data

    def __init__(self, inner: httpx.AsyncByteStream, tasks: set[asyncio.Task[None]]) -> None:
        self._inner = inner
        self._chunks: AsyncIterator[bytes] = aiter(inner)
        self._tail = b""
        self._ended = False
        self._tasks = tasks

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            self._ended = True
            raise
        self._tail = self._tail[-TAIL:] + chunk[-TAIL:]
        return chunk

    async def aclose(self) -> None:
        if self._ended or not DONE_LINE.search(self._tail):
            await self._inner.aclose()
            return
        task = asyncio.get_running_loop().create_task(self._finish())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self) -> None:
        read = 0
        try:
            async with asyncio.timeout(self.DRAIN_S):
                async for chunk in self._chunks:
                    read += len(chunk)
                    if read > self.DRAIN_BYTES:
                        break  # not an ending: let httpx close the connection
        except (TimeoutError, httpx.HTTPError):
            pass  # the connection is closed, not reused
        finally:
            with contextlib.suppress(Exception):
                # Fully read: the connection goes back to the pool; otherwise it is closed.
                await self._inner.aclose()
