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

    def any_usable(self) -> bool:
        now = self.clock()
        return any(self._usable(s, now) for s in self.states)

    def _describe(self, state: KeyState, now: float) -> str:
        if state.rejected:
            return f"{state.tag} rejected by Poe"
        if state.cooling_until <= now:
            return f"{state.tag} ready"
        return f"{state.tag} {state.reason}, usable again in {state.cooling_until - now:.0f} s"

    def exhausted(self) -> OpenAIError:
        """The answer when no key is usable, naming each key's state: a rate limit is worth
        waiting out (429, retry-after); no points is a stop until they come back (429, no
        retry); keys Poe rejected are the proxy's configuration to fix (502, no retry)."""
        now = self.clock()
        states = ", ".join(self._describe(s, now) for s in self.states)
        resting = [s for s in self.states if not s.rejected and s.cooling_until > now]
        limited = [s.cooling_until - now for s in resting if s.reason == "rate-limited"]
        if limited:
            wait = max(1, math.ceil(min(limited)))
            return OpenAIError(
                429,
                f"Every Poe key of this proxy is resting ({states}); try again in {wait} s.",
                "requests",
                "rate_limit_exceeded",
                None,
                {"retry-after": str(wait)},
            )
        rejected = any(s.rejected for s in self.states)
        fix = " Set valid keys in poe_api_key (or poe_api_key_file)." if rejected else ""
        if resting:
            what = "out of points or rejected by Poe" if rejected else "out of points"
            return OpenAIError(
                429,
                f"Every Poe key of this proxy is {what} ({states}).{fix}",
                "insufficient_quota",
                "insufficient_quota",
                None,
                dict(NO_RETRY),
            )
        return OpenAIError(
            502,
            f"Poe rejected every key of this proxy ({states}): set valid keys in poe_api_key "
            "(or poe_api_key_file) and restart.",
            "server_error",
            "poe_key_rejected",
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
