"""Timing for long streams with one timer per stream, not one per item.

A streamed answer can be tens of thousands of Poe events. ``asyncio.timeout`` around each wait,
or a task plus ``asyncio.wait`` per item for keep-alives, costs a timer (and a task) per event;
here a single timer per stream is re-armed only when it fires early, so an event costs a clock
read and a few attribute stores.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class Watchdog:
    """Times out a series of waits, one at a time, each with its own deadline, like
    ``asyncio.timeout`` (the waiting task is cancelled, the wait raises TimeoutError)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._task: asyncio.Task[Any] | None = None  # the task waiting now, if any
        self._due = math.inf  # when that wait times out
        self._fired = False

    async def wait(self, awaitable: Awaitable[T], due: float) -> T:
        """``awaitable``'s result; TimeoutError if it is not there by ``due`` (loop time)."""
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._task, self._due, self._fired = task, due, False
        if due < self._timer_at:
            self._arm(due)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._fired and task.uncancel() <= cancelling:
                raise TimeoutError from None
            raise
        finally:
            self._task = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self._loop.call_at(when, self._expire), when

    def _expire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        if self._task is None:
            return  # nobody waits: the next wait arms the timer again
        if self._loop.time() < self._due:
            self._arm(self._due)  # armed for an earlier wait: this one has longer
            return
        self._fired = True
        self._task.cancel()


_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Feed:
    """Runs a source in one task of its own and hands its items over one at a time; the
    consumer gets None instead whenever it has waited ``interval`` seconds."""

    def __init__(self, source: AsyncIterator[Any], interval: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._source = source
        self._interval = interval
        self._ready: list[Any] = []  # an item the consumer has not taken yet (at most one)
        self._taken: asyncio.Future[None] | None = None  # the pump waits for it to be taken
        self._waiter: asyncio.Future[Any] | None = None  # the consumer waits for an item
        self._since = 0.0  # when the consumer began waiting
        self._timer: asyncio.TimerHandle | None = None
        # Last: with mitmproxy's eager task factory the pump starts running right here.
        self._pump_task = self._loop.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for item in self._source:
                await self._put(item)
        except Exception as e:
            await self._put(_Failed(e))
        else:
            await self._put(_END)
        finally:
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _put(self, item: Any) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(item)
            return
        self._ready.append(item)
        self._taken = self._loop.create_future()
        await self._taken

    async def get(self) -> Any:
        """The next item, None for a tick, or _END."""
        if self._ready:
            item = self._ready.pop()
            taken, self._taken = self._taken, None
            if taken is not None and not taken.done():
                taken.set_result(None)
        else:
            self._waiter = waiter = self._loop.create_future()
            self._since = self._loop.time()
            if self._timer is None:
                self._timer = self._loop.call_at(self._since + self._interval, self._tick)
            try:
                item = await waiter
            finally:
                self._waiter = None
        if isinstance(item, _Failed):
            raise item.error
        return item

    def _tick(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # the consumer is busy: its next wait arms the timer again
        due = self._since + self._interval
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._tick)  # armed for an earlier wait
            return
        self._waiter = None
        waiter.set_result(None)

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pump_task.done():
            self._pump_task.cancel()
            # Only the pump's own ending is expected here: the caller's cancellation (the
            # client left) must go on up, so it is not suppressed.
            await asyncio.wait([self._pump_task])
            if not self._pump_task.cancelled():
                self._pump_task.exception()  # retrieved; the consumer already has what it needs


async def with_ticks(source: AsyncIterator[Any], interval: float) -> AsyncIterator[Any]:
    """``source``'s items, and None whenever ``interval`` seconds pass without one (a stream
    sends a keep-alive then). The pending item is never cancelled by a tick."""
    feed = _Feed(source, interval)
    try:
        while (item := await feed.get()) is not _END:
            yield item
    finally:
        await feed.aclose()
