"""Drives Poe answers to the client: one or several Poe queries (``n``), each through text
assembly, tool calls, stop sequences, the token limit and JSON checking.

Format-neutral: chat completions, legacy completions and the Responses API each turn the
``Piece``s into their own wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from addon.chat import ChatReply
from addon.config import Timeouts
from addon.errors import NO_RETRY, OpenAIError, PoeFailure
from addon.limits import StopFilter, TokenLimit, clean_json
from addon.pacing import Watchdog
from addon.poe import PoeError, PoeEvent
from addon.textbuffer import TextBuffer
from addon.tokens import TokenCounter


@dataclass
class Piece:
    index: int
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish: str | None = None  # set on the last piece of a choice


def invalid_json(text: str) -> OpenAIError:
    return OpenAIError(
        502,
        f"The bot did not answer with valid JSON (response_format asked for it): {text[:200]!r}",
        "server_error",
        "invalid_json_output",
        None,
        dict(NO_RETRY),  # Poe answered (and charged); a retry would pay for the same bot again
    )


class ReplyRunner:
    """One choice: Poe events in, pieces of the client's answer out."""

    def __init__(
        self,
        index: int,
        events: AsyncIterator[PoeEvent],
        counter: TokenCounter,
        *,
        parallel_tool_calls: bool = True,
        stop: list[str] | None = None,
        max_tokens: int | None = None,
        json_mode: bool = False,
        json_schema: dict[str, Any] | None = None,
        timeouts: Timeouts | None = None,
        bot: str = "",
    ) -> None:
        self.index = index
        self.events = events
        self.bot = bot
        self.timeouts = timeouts or Timeouts()
        self._loop = asyncio.get_running_loop()
        self.deadline = self._loop.time() + self.timeouts.total
        self._watchdog = Watchdog()  # one timer for all of this answer's waits on Poe
        self.key = ""  # the Poe key that answers (set by whoever starts the runner)
        self.reply = ChatReply(parallel_tool_calls)
        self.stop = StopFilter(stop or [])
        self.limit = TokenLimit(counter, max_tokens)
        self.json_mode = json_mode
        self.json_schema = json_schema
        self._text = TextBuffer()  # what the client has been given
        self.cut = False  # a stop sequence or the token limit ended the answer early
        self.finish_reason: str | None = None
        self._pending: list[Piece] = []
        self.first_event_at: float | None = None  # time.monotonic() of Poe's first event

    def _piece(self, text: str, deltas: list[dict[str, Any]]) -> Piece | None:
        if self.cut:
            return None
        text = self.stop.feed(text)
        text = self.limit.feed(text)
        self.cut = self.stop.stopped or self.limit.reached
        self._text.append(text)
        if self.json_mode:
            text = ""  # checked and sent whole at the end
        if not text and not deltas:
            return None
        return Piece(self.index, text, deltas)

    def _feed(self, event: PoeEvent) -> Piece | None:
        return self._piece(*self.reply.feed(event.kind, event.text, event.attachment, event.data))

    async def _next(self, first: bool) -> PoeEvent | None:
        """Poe's next event, or None at the end; PoeError when Poe is silent too long."""
        due = self._loop.time() + (self.timeouts.first_event if first else self.timeouts.idle)
        kind = "first event" if first else "idle"
        if self.deadline <= due:
            due, kind = self.deadline, "total"
        try:
            return await self._watchdog.wait(anext(self.events), due)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise PoeError(PoeFailure(self.bot, timeout=kind)) from None

    async def first(self) -> None:
        """Wait for Poe's first event that says something: it decides the HTTP status.
        Status text ("Thinking...") is held back, so it does not count: a bot that fails
        after it still fails with a real HTTP status (a stream waits at most
        poe_header_hold_s for this; see Call.start)."""
        first = True
        while (event := await self._next(first=first)) is not None:
            if event.kind == "meta":
                continue
            if first:
                self.first_event_at = time.monotonic()
            first = False
            piece = self._feed(event)
            if piece is not None:
                self._pending.append(piece)
                return
            if self.cut or len(self._text):
                return  # the answer has begun (JSON mode sends its text at the end)

    async def pieces(self) -> AsyncIterator[Piece]:
        """The rest of the answer; the last piece carries ``finish``. Raises PoeError (after
        passing on whatever text was held back) or OpenAIError (invalid JSON)."""
        for piece in self._pending:
            yield piece
        self._pending.clear()
        try:
            if not self.cut:
                while (event := await self._next(first=False)) is not None:
                    piece = self._feed(event)
                    if piece is not None:
                        yield piece
                    if self.cut:
                        break  # stop or limit reached: drop the Poe query now
        except PoeError:
            tail = self._finish_text(failed=True)
            if tail:
                yield Piece(self.index, tail)
            raise
        finally:
            await self.aclose()
        tail = self._finish_text()
        if self.json_mode and (self.text.strip() or not self.tool_calls):
            cleaned = clean_json(self.text, self.json_schema)
            # Text the client's own stop sequence or token limit cut short is what it asked
            # for: only an answer the bot itself got wrong is refused (Poe was paid either way).
            if cleaned is None and not self.limit.reached and not self.stop.stopped:
                raise invalid_json(self.text)
            self.text = cleaned if cleaned is not None else self.text
            tail = self.text
        self.finish_reason = (
            "length"
            if self.limit.reached
            else "tool_calls"
            if self.reply.finish_reason == "tool_calls" and not self.stop.stopped
            else "stop"
        )
        yield Piece(self.index, tail, finish=self.finish_reason)

    def _finish_text(self, failed: bool = False) -> str:
        answer = self.reply.answer
        held = "" if self.cut else answer.abandon() if failed else answer.finish()
        piece = self._piece(held, []) if held else None
        text = piece.text if piece else ""
        rest = self.limit.feed(self.stop.flush()) if not self.cut else ""
        self._text.append(rest)
        return "" if self.json_mode else text + rest

    @property
    def text(self) -> str:
        """What the client has been given (the JSON checked, in JSON mode)."""
        return str(self._text)

    @text.setter
    def text(self, value: str) -> None:
        self._text = TextBuffer(value)

    @property
    def final_text(self) -> str:
        """The whole answer for a non-streamed reply: Poe's final text unless cut short."""
        if self.cut or self.json_mode:
            return self.text
        return self.reply.answer.answer

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return self.reply.tools.merged()

    async def aclose(self) -> None:
        self._watchdog.close()
        with contextlib.suppress(Exception):
            await self.events.aclose()  # type: ignore[attr-defined]


async def merge(runners: list[ReplyRunner]) -> AsyncIterator[Piece]:
    """The pieces of all choices as they come (interleaved by index when n > 1)."""
    if len(runners) == 1:  # the common case, without tasks or queues
        async for piece in runners[0].pieces():
            yield piece
        return
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

    async def pump(runner: ReplyRunner) -> None:
        try:
            async for piece in runner.pieces():
                await queue.put(piece)
        except BaseException as e:
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(r)) for r in runners]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
