"""The pool of configured Poe keys: used in turn, cooled down when Poe says slow down or out of
points, set aside when rejected. No points are ever spent to check a key: a key's state is
learned from the answers real requests get.

With shared state (poe_state_url) every instance sees a key's rest or rejection at once and
takes its turn from one counter; this pool's own record is kept too, and used alone while the
shared store cannot be reached.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from addon.config import fingerprint, secret_digest
from addon.errors import NO_RETRY, OpenAIError
from addon.state import KeyHealth, LocalState, State, Unavailable

logger = logging.getLogger(__name__)

DEFAULT_COOLDOWN_S = 10.0  # an HTTP 429 without Retry-After
OUT_OF_POINTS_COOLDOWN_S = 3600.0
MAX_REST_S = 24 * 3600.0  # the longest Retry-After honoured


@dataclass
class KeyState:
    key: str
    cooling_until: float = 0.0
    rejected: bool = False
    reason: str = ""

    # what the shared state said at the last pick (the later of the two counts)
    shared_until: float = 0.0
    shared_reason: str = ""
    shared_rejected: bool = False

    @property
    def tag(self) -> str:
        return fingerprint(self.key)

    @property
    def digest(self) -> str:
        return secret_digest(self.key)

    def until(self) -> float:
        return max(self.cooling_until, self.shared_until)

    def why(self) -> str:
        return self.shared_reason if self.shared_until > self.cooling_until else self.reason

    def out(self) -> bool:
        return self.rejected or self.shared_rejected

    def learn(self, health: KeyHealth | None, now: float) -> None:
        self.shared_until = now + health.rest_s if health else 0.0
        self.shared_reason = health.reason if health else ""
        self.shared_rejected = bool(health and health.rejected)


class KeyPool:
    def __init__(
        self,
        keys: Iterable[str],
        clock: Callable[[], float] = time.monotonic,
        state: State | None = None,
    ) -> None:
        self.states = [KeyState(k) for k in keys]
        self.clock = clock
        self.state: State = state if state is not None else LocalState(clock)
        self._turn = 0

    def _usable(self, state: KeyState, now: float) -> bool:
        return not state.out() and state.until() <= now

    async def _shared_turn(self) -> int | None:
        """The deployment's turn, with every key's shared health learned; None (this pool's
        own record alone) while the shared store cannot be reached."""
        try:
            turn, health = await self.state.key_view([s.digest for s in self.states])
        except Unavailable:
            for state in self.states:
                state.learn(None, 0.0)
            return None
        now = self.clock()
        for state in self.states:
            state.learn(health.get(state.digest), now)
        return turn

    async def pick(self, exclude: Iterable[str] = ()) -> str | None:
        """The next usable key in turn, or None when every key is out."""
        skip = set(exclude)
        turn = await self._shared_turn()
        start = self._turn if turn is None else turn % len(self.states)
        now = self.clock()
        for offset in range(len(self.states)):
            state = self.states[(start + offset) % len(self.states)]
            if state.key not in skip and self._usable(state, now):
                self._turn = (start + offset + 1) % len(self.states)
                return state.key
        return None

    def _state(self, key: str) -> KeyState | None:
        return next((s for s in self.states if s.key == key), None)

    async def cool(self, key: str, seconds: float, reason: str) -> None:
        state = self._state(key)
        if state is None:
            return
        state.cooling_until = max(state.cooling_until, self.clock() + seconds)
        state.reason = reason
        logger.warning("poe-openai: %s %s; resting it for %.0f s", state.tag, reason, seconds)
        with contextlib.suppress(Unavailable):  # (logged by the state; this pool still knows)
            await self.state.rest_key(state.digest, seconds, reason)

    async def reject(self, key: str) -> None:
        state = self._state(key)
        if state is None:
            return
        state.rejected = True
        state.reason = "rejected by Poe"
        until = (
            "until restart" if isinstance(self.state, LocalState) else "for 24 h, by any instance"
        )
        logger.warning("poe-openai: %s was rejected by Poe; not used again %s", state.tag, until)
        with contextlib.suppress(Unavailable):
            await self.state.reject_key(state.digest)

    def next_ready_in(self) -> float | None:
        """Seconds until a cooled key is usable again (None if all are rejected)."""
        now = self.clock()
        waits = [max(0.0, s.until() - now) for s in self.states if not s.out()]
        return min(waits) if waits else None

    def status(self) -> list[dict[str, object]]:
        now = self.clock()
        return [
            {
                "key": s.tag,
                "state": "rejected"
                if s.out()
                else f"cooling {s.until() - now:.0f}s ({s.why()})"
                if s.until() > now
                else "ready",
            }
            for s in self.states
        ]

    def any_usable(self) -> bool:
        now = self.clock()
        return any(self._usable(s, now) for s in self.states)

    def _describe(self, state: KeyState, now: float) -> str:
        if state.out():
            return f"{state.tag} rejected by Poe"
        if state.until() <= now:
            return f"{state.tag} ready"
        return f"{state.tag} {state.why()}, usable again in {state.until() - now:.0f} s"

    def exhausted(self) -> OpenAIError:
        """The answer when no key is usable, naming each key's state: a rate limit is worth
        waiting out (429, retry-after); no points is a stop until they come back (429, no
        retry); keys Poe rejected are the proxy's configuration to fix (502, no retry)."""
        now = self.clock()
        states = ", ".join(self._describe(s, now) for s in self.states)
        resting = [s for s in self.states if not s.out() and s.until() > now]
        limited = [s.until() - now for s in resting if s.why() == "rate-limited"]
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
        rejected = any(s.out() for s in self.states)
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
        seconds = float(value)
    except ValueError:
        return None
    # "inf" or "1e400" would rest a key past what a clock (or Redis's expiry) can hold
    return min(max(0.0, seconds), MAX_REST_S) if math.isfinite(seconds) else None
