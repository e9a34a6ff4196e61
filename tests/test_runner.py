"""The runner (addon/runner.py): its timeouts, and its cost per event on long answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from test_pacing import Counting, N, run

from addon.config import Timeouts
from addon.poe import PoeError, PoeEvent
from addon.runner import ReplyRunner
from addon.tokens import TokenCounter

# --- timeouts ----------------------------------------------------------------------


async def events(*steps: float | str) -> AsyncIterator[PoeEvent]:
    for step in steps:
        if isinstance(step, float):
            await asyncio.sleep(step)
        else:
            yield PoeEvent("text", text=step)


def runner(source: AsyncIterator[PoeEvent], **timeouts: float) -> ReplyRunner:
    return ReplyRunner(0, source, TokenCounter("gpt-4o"), timeouts=Timeouts(**timeouts), bot="b")


async def answer(r: ReplyRunner) -> str:
    await r.first()
    return "".join([p.text async for p in r.pieces()])


@pytest.mark.parametrize(
    ("steps", "kind"),
    [
        ((0.3, "late"), "first event"),
        (("a", 0.3, "late"), "idle"),
        (("a", 0.15, "b", 0.15, "c", 0.15, "d"), "total"),
    ],
)
def test_runner_timeouts(steps: tuple[float | str, ...], kind: str) -> None:
    async def main() -> None:
        r = runner(events(*steps), first_event=0.2, idle=0.2, total=0.4)
        with pytest.raises(PoeError) as info:
            await answer(r)
        assert info.value.failure.timeout == kind

    run(main())


def test_runner_quick_events_are_no_timeout_and_arm_one_timer() -> None:
    async def main() -> str:
        counting = Counting()
        r = runner(events(*["x"] * N), first_event=0.2, idle=0.2, total=60)
        text = await answer(r)
        assert counting.timers <= 2
        return text

    assert run(main()) == "x" * N


def test_runner_events_just_inside_the_idle_limit_never_time_out() -> None:
    async def main() -> str:
        r = runner(events("a", 0.1, "b", 0.1, "c", 0.1, "d"), first_event=0.15, idle=0.15)
        return await answer(r)

    assert run(main()) == "abcd"


# --- cost per event ----------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [None, 10**9])
def test_runner_work_per_event_does_not_grow_with_the_answer(max_tokens: int | None) -> None:
    async def main() -> tuple[float, float, int]:
        queue: asyncio.Queue[PoeEvent] = asyncio.Queue()

        async def source() -> AsyncIterator[PoeEvent]:
            while True:
                yield await queue.get()

        r = ReplyRunner(0, source(), TokenCounter("gpt-4o"), max_tokens=max_tokens)
        queue.put_nowait(PoeEvent("text", text="a"))
        await r.first()
        pieces = r.pieces()
        assert (await anext(pieces)).text == "a"

        async def batch(text: str = "tok ", n: int = 1000) -> float:
            started = time.perf_counter()
            for _ in range(n):
                queue.put_nowait(PoeEvent("text", text=text))
                await anext(pieces)
            return time.perf_counter() - started

        early = min([await batch() for _ in range(3)])
        await batch("word " * 800, 250)  # a million characters
        late = min([await batch() for _ in range(3)])
        await pieces.aclose()
        return early, late, len(r.text)

    early, late, length = run(main())
    assert late < 5 * early, f"{late * 1000:.1f} ms vs {early * 1000:.1f} ms per 1000 events"
    assert length == 1 + 6000 * 4 + 250 * 4000
