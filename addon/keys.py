"""The pool of configured Poe keys: used in turn, cooled down when Poe says slow down or out of
points, set aside when rejected. No points are ever spent to check a key: a key's state is
learned from the answers real requests get.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from addon.config import fingerprint
from addon.errors import NO_RETRY, OpenAIError

logger = logging.getLogger(__name__)

DEFAULT_COOLDOWN_S = 10.0  # an HTTP 429 without Retry-After
OUT_OF_POINTS_COOLDOWN_S = 3600.0


@dataclass
class KeyState:
    key: str
    cooling_until: float = 0.0
    rejected: bool = False
    reason: str = ""

    @property
    def tag(self) -> str:
        return fingerprint(self.key)


class KeyPool:
    def __init__(self, keys: Iterable[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.states = [KeyState(k) for k in keys]
        self.clock = clock
        self._turn = 0

    def _usable(self, state: KeyState, now: float) -> bool:
        return not state.rejected and state.cooling_until <= now

    def pick(self, exclude: Iterable[str] = ()) -> str | None:
        """The next usable key in turn, or None when every key is out."""
        skip = set(exclude)
        now = self.clock()
        for offset in range(len(self.states)):
            state = self.states[(self._turn + offset) % len(self.states)]
            if state.key not in skip and self._usable(state, now):
                self._turn = (self._turn + offset + 1) % len(self.states)
                return state.key
        return None

    def _state(self, key: str) -> KeyState | None:
        return next((s for s in self.states if s.key == key), None)

    def cool(self, key: str, seconds: float, reason: str) -> None:
        state = self._state(key)
        if state is None:
            return
        state.cooling_until = max(state.cooling_until, self.clock() + seconds)
        state.reason = reason
        logger.warning("poe-openai: %s %s; resting it for %.0f s", state.tag, reason, seconds)

    def reject(self, key: str) -> None:
        state = self._state(key)
        if state is None:
            return
        state.rejected = True
        state.reason = "rejected by Poe"
        logger.warning(
            "poe-openai: %s was rejected by Poe; not used again until restart", state.tag
        )

    def next_ready_in(self) -> float | None:
        """Seconds until a cooled key is usable again (None if all are rejected)."""
        now = self.clock()
        waits = [max(0.0, s.cooling_until - now) for s in self.states if not s.rejected]
        return min(waits) if waits else None

    def status(self) -> list[dict[str, object]]:
        now = self.clock()
        return [
            {
                "key": s.tag,
                "state": "rejected"
                if s.rejected
                else f"cooling {s.cooling_until - now:.0f}s ({s.reason})"
                if s.cooling_until > now
                else "ready",
            }
            for s in self.states
        ]

    def exhausted(self) -> OpenAIError:
        """The answer when no key is usable: a rate limit to wait out, or a hard stop."""
        now = self.clock()
        waits = [
            s.cooling_until - now
            for s in self.states
            if not s.rejected and s.cooling_until > now and s.reason == "rate-limited"
        ]
        if waits:
            wait = max(1, math.ceil(min(waits)))
            return OpenAIError(
                429,
                f"Every Poe key of this proxy is rate-limited; try again in {wait} s.",
                "requests",
                "rate_limit_exceeded",
                None,
                {"retry-after": str(wait)},
            )
        ready = self.next_ready_in()
        when = f" The first is usable again in {ready:.0f} s." if ready else ""
        return OpenAIError(
            429,
            "Every Poe key of this proxy is rate-limited, out of points or rejected." + when,
            "insufficient_quota",
            "insufficient_quota",
            None,
            dict(NO_RETRY),
        )


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
