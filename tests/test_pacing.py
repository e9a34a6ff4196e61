"""Stream timing (addon/pacing.py): the semantics of a timeout per wait and of a task per item,
with one timer and one task per stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from addon.pacing import Watchdog, with_ticks

N = 1000


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


class Counting:
    """Counts timers armed and tasks created on the running loop."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.timers = 0
        self.tasks = 0
        call_at = loop.call_at

        def counted_call_at(*args: Any, **kwargs: Any) -> asyncio.TimerHandle:
            self.timers += 1
            return call_at(*args, **kwargs)

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task:
            self.tasks += 1
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.call_at = counted_call_at  # type: ignore[method-assign]
        loop.set_task_factory(factory)  # type: ignore[arg-type]


async def quick(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0)
        yield i


async def spaced(*steps: float | int) -> AsyncIterator[int]:
    """Yields the ints; sleeps the floats."""
    for step in steps:
        if isinstance(step, float):
            await asyncio.sleep(step)
        else:
            yield step


# --- Watchdog -----------------------------------------------------------------------------------


def test_watchdog_times_out_a_slow_wait_and_passes_quick_ones() -> None:
    async def main() -> None:
        dog = Watchdog()
        loop = asyncio.get_running_loop()
        assert await dog.wait(asyncio.sleep(0.01, "quick"), loop.time() + 0.5) == "quick"
        started = loop.time()
        with pytest.raises(TimeoutError):
            await dog.wait(asyncio.sleep(5), loop.time() + 0.1)
        assert 0.09 < loop.time() - started < 0.5
        # after a timeout it still works, and the task is not left cancelling
        assert await dog.wait(asyncio.sleep(0, "again"), loop.time() + 0.5) == "again"
        current = asyncio.current_task()
        assert current is not None and current.cancelling() == 0
        dog.close()

    run(main())


def test_watchdog_arms_one_timer_for_many_waits() -> None:
    async def main() -> None:
        counting = Counting()
        dog = Watchdog()
        loop = asyncio.get_running_loop()
        for _ in range(N):
            await dog.wait(asyncio.sleep(0), loop.time() + 60)
        dog.close()
        assert counting.timers <= 2

    run(main())


def test_watchdog_a_shorter_wait_after_a_longer_one_still_times_out() -> None:
    async def main() -> None:
        dog = Watchdog()
        loop = asyncio.get_running_loop()
        await dog.wait(asyncio.sleep(0), loop.time() + 60)
        with pytest.raises(TimeoutError):
            await dog.wait(asyncio.sleep(5), loop.time() + 0.05)
        dog.close()

    run(main())


def test_watchdog_passes_on_a_cancellation_that_is_not_its_own() -> None:
    async def main() -> None:
        dog = Watchdog()
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(dog.wait(asyncio.sleep(5), loop.time() + 60))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        dog.close()

    run(main())


# --- with_ticks ---------------------------------------------------------------------------------


def test_ticks_pass_every_item_in_order_with_one_task() -> None:
    async def main() -> None:
        counting = Counting()
        got = [item async for item in with_ticks(quick(N), 60)]
        assert got == list(range(N))
        assert counting.tasks <= 2 and counting.timers <= 2

    run(main())


def test_ticks_while_the_source_is_silent_and_the_pending_item_survives() -> None:
    async def main() -> list[Any]:
        return [item async for item in with_ticks(spaced(1, 0.35, 2), 0.1)]

    got = run(main())
    assert got[0] == 1 and got[-1] == 2
    assert 2 <= got.count(None) <= 4 and len(got) == got.count(None) + 2


def test_ticks_follow_the_consumer_not_the_source() -> None:
    # A consumer that spends longer than the interval on each item gets no ticks for it.
    async def main() -> list[Any]:
        got = []
        async for item in with_ticks(spaced(1, 2, 3), 0.05):
            got.append(item)
            await asyncio.sleep(0.1)
        return got

    assert run(main()) == [1, 2, 3]


def test_ticks_raise_the_source_error_after_its_items() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        raise ValueError("boom")

    async def main() -> list[Any]:
        got = []
        with pytest.raises(ValueError, match="boom"):
            async for item in with_ticks(failing(), 60):
                got.append(item)
        return got

    assert run(main()) == [1]


def test_ticks_closed_early_close_the_source() -> None:
    async def main() -> bool:
        done = asyncio.Event()

        async def source() -> AsyncIterator[int]:
            try:
                yield 1
                await asyncio.sleep(60)
                yield 2
            finally:
                done.set()

        ticks = with_ticks(source(), 60)
        assert await anext(ticks) == 1
        await ticks.aclose()
        await asyncio.wait_for(done.wait(), 1)
        return True

    assert run(main())


def test_ticks_consumer_cancelled_cancels_the_source() -> None:
    async def main() -> bool:
        done = asyncio.Event()

        async def source() -> AsyncIterator[int]:
            try:
                await asyncio.sleep(60)
                yield 1
            finally:
                done.set()

        async def consume() -> None:
            async for _ in with_ticks(source(), 60):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(done.wait(), 1)
        return True

    assert run(main())
