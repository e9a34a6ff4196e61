"""What instances of the proxy can share: stored Responses, the key pool's health, uploads.

One small interface, two implementations: ``LocalState`` keeps everything in this process (the
default: a single user needs nothing new) and ``RedisState`` keeps it in Redis or Valkey
(``poe_state_url``), so several workers, machines or mitmproxy instances act as one.

Keys and tokens never reach Redis: keys are named by digests (``addon.config.secret_digest``),
stored responses carry their owner's digest. A store that cannot be reached is not a failure
of the proxy: keys and uploads fall back to this process's own state (one warning line per
outage), and only requests that need a stored response answer 503 until it is back.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from addon.config import StateURL
from addon.errors import OpenAIError
from addon.responses import ResponseStore, Stored

logger = logging.getLogger(__name__)

T = TypeVar("T")

PREFIX = "poe-openai:"
REJECTED_TTL_S = 24 * 3600  # a rejected key stays out this long for every instance
UPLOAD_TTL_S = 24 * 3600  # Poe's attachment URLs outlive a day of reuse
TURN_TTL_S = 24 * 3600  # the key rotation's counter, after a day without requests
UPLOAD_CACHE_SIZE = 512  # per process
OUTAGE_RETRY_S = 1.0  # a store found down is not asked again for this long
STORE_RETRY_AFTER_S = 5


class Unavailable(Exception):
    """The shared store cannot be reached right now (already logged, once per outage)."""


@dataclass(frozen=True)
class KeyHealth:
    """What the deployment knows about one key: seconds it must still rest, and why."""

    rest_s: float = 0.0
    reason: str = ""
    rejected: bool = False


class State(Protocol):
    """The shared parts of the proxy; every method may raise Unavailable (Redis only)."""

    max_entries: int
    max_age_s: float

    def describe(self) -> str: ...

    # stored Responses, by id and by output item id; another owner's is as good as unknown
    async def put_response(
        self, response: dict[str, Any], conversation: list[dict[str, Any]], owner: str
    ) -> None: ...
    async def get_response(self, response_id: str, owner: str) -> Stored | None: ...
    async def get_items(self, item_ids: Iterable[str], owner: str) -> dict[str, dict[str, Any]]: ...
    async def delete_response(self, response_id: str, owner: str) -> bool: ...

    # the key pool's health, by key digest; view() also takes the next turn of the rotation
    async def key_view(self, digests: list[str]) -> tuple[int, dict[str, KeyHealth]]: ...
    async def rest_key(self, digest: str, seconds: float, reason: str) -> None: ...
    async def reject_key(self, digest: str) -> None: ...

    # uploads: (key digest, content digest) -> the attachment's JSON
    async def get_upload(self, scope: tuple[str, str]) -> str | None: ...
    async def put_upload(self, scope: tuple[str, str], attachment: str) -> None: ...

    def stored_count(self) -> int | None: ...
    async def aclose(self) -> None: ...


def store_unavailable(param: str | None = None) -> OpenAIError:
    return OpenAIError(
        503,
        "The shared response store (poe_state_url) cannot be reached right now, so stored "
        f"responses cannot be read or changed; try again in {STORE_RETRY_AFTER_S} s. Nothing "
        "was sent to Poe.",
        "server_error",
        "store_unavailable",
        param,
        {"retry-after": str(STORE_RETRY_AFTER_S)},
    )


# --- in this process ------------------------------------------------------------------------------


class LocalState:
    """Everything in this process's memory: today's behaviour, and nothing to install."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.responses = ResponseStore()
        self.clock = clock
        self._rest: dict[str, tuple[float, str]] = {}  # digest -> (resting until, reason)
        self._rejected: set[str] = set()
        self._turn = 0
        self._uploads: OrderedDict[tuple[str, str], str] = OrderedDict()

    @property
    def max_entries(self) -> int:
        return self.responses.max_entries

    @max_entries.setter
    def max_entries(self, value: int) -> None:
        self.responses.max_entries = value

    @property
    def max_age_s(self) -> float:
        return self.responses.max_age_s

    @max_age_s.setter
    def max_age_s(self, value: float) -> None:
        self.responses.max_age_s = value

    def describe(self) -> str:
        return "in-process"

    async def put_response(
        self, response: dict[str, Any], conversation: list[dict[str, Any]], owner: str
    ) -> None:
        self.responses.put(response, conversation, owner)

    async def get_response(self, response_id: str, owner: str) -> Stored | None:
        return self.responses.get(response_id, owner)

    async def get_items(self, item_ids: Iterable[str], owner: str) -> dict[str, dict[str, Any]]:
        found = {i: self.responses.item(i, owner) for i in item_ids}
        return {i: item for i, item in found.items() if item is not None}

    async def delete_response(self, response_id: str, owner: str) -> bool:
        return self.responses.delete(response_id, owner)

    async def key_view(self, digests: list[str]) -> tuple[int, dict[str, KeyHealth]]:
        now = self.clock()
        turn, self._turn = self._turn, self._turn + 1
        view = {}
        for digest in digests:
            until, reason = self._rest.get(digest, (0.0, ""))
            view[digest] = KeyHealth(max(0.0, until - now), reason, digest in self._rejected)
        return turn, view

    async def rest_key(self, digest: str, seconds: float, reason: str) -> None:
        until = self.clock() + seconds
        if until > self._rest.get(digest, (0.0, ""))[0]:
            self._rest[digest] = (until, reason)

    async def reject_key(self, digest: str) -> None:
        self._rejected.add(digest)

    async def get_upload(self, scope: tuple[str, str]) -> str | None:
        found = self._uploads.get(scope)
        if found is not None:
            self._uploads.move_to_end(scope)
        return found

    async def put_upload(self, scope: tuple[str, str], attachment: str) -> None:
        self._uploads[scope] = attachment
        self._uploads.move_to_end(scope)
        while len(self._uploads) > UPLOAD_CACHE_SIZE:
            self._uploads.popitem(last=False)

    def stored_count(self) -> int | None:
        return len(self.responses)

    async def aclose(self) -> None:
        pass


# --- Redis / Valkey -------------------------------------------------------------------------------

# ARGV: record, ttl ms, id, key prefix, max entries, output item ids...
# Stores one response, indexes its output items, and keeps the store within its size: the
# oldest responses beyond max_entries go first, with their item index (the server's clock
# decides, for every instance).
_PUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local p = ARGV[4]
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
local items = {}
for i = 6, #ARGV do
  redis.call('SET', p .. 'item:' .. ARGV[i], ARGV[3], 'PX', ttl)
  items[#items + 1] = ARGV[i]
end
redis.call('SET', p .. 'items:' .. ARGV[3], table.concat(items, ' '), 'PX', ttl)
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #old, 2 do
    local listed = redis.call('GET', p .. 'items:' .. old[i])
    if listed then
      for item in string.gmatch(listed, '%S+') do redis.call('DEL', p .. 'item:' .. item) end
    end
    redis.call('DEL', p .. 'resp:' .. old[i], p .. 'items:' .. old[i])
  end
end
return redis.call('ZCARD', KEYS[2])
"""

# A key rests until the later of its current and its new end: an atomic max across instances.
_REST = """
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
end
return 1
"""


class Link:
    """Every call to Redis, bounded in time; an outage is logged once, and while it lasts the
    store is asked at most once per OUTAGE_RETRY_S, so requests do not each wait for it."""

    def __init__(self, where: str, timeout: float = 1.5) -> None:
        self.where = where
        self.timeout = timeout
        self.down = False
        self.retry_at = 0.0

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        if self.down and time.monotonic() < self.retry_at:
            raise Unavailable
        try:
            async with asyncio.timeout(self.timeout):
                result = await call()
        except (OSError, TimeoutError, RedisError) as e:
            self.retry_at = time.monotonic() + OUTAGE_RETRY_S
            if not self.down:
                self.down = True
                logger.warning(
                    "poe-openai: shared state %s cannot be reached (%s); keys and uploads use "
                    "this instance's own state and stored responses answer 503 until it is "
                    "back (checked each second); check that Redis runs there",
                    self.where,
                    type(e).__name__,
                )
            raise Unavailable from None
        if self.down:
            self.down = False
            logger.warning("poe-openai: shared state %s is back; sharing again", self.where)
        return result


class RedisState:
    """The same state in Redis (or Valkey), shared by every instance that names it."""

    def __init__(self, url: StateURL, timeout: float = 1.5) -> None:
        self.url = url
        self.max_entries = 1000
        self.max_age_s = 3600.0
        self.link = Link(url.describe(), timeout)
        self._count: int | None = None
        kwargs: dict[str, Any] = {}
        if url.password:  # (from the environment; one in the URL is the URL's)
            kwargs["password"] = url.password
        self.redis = redis.asyncio.Redis.from_url(
            url.url,
            decode_responses=True,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # the Link decides when to try again
            **kwargs,
        )
        self._put = self.redis.register_script(_PUT)
        self._rest = self.redis.register_script(_REST)

    def describe(self) -> str:
        return self.url.describe()

    async def put_response(
        self, response: dict[str, Any], conversation: list[dict[str, Any]], owner: str
    ) -> None:
        record = json.dumps({"response": response, "conversation": conversation, "owner": owner})
        items = [str(i["id"]) for i in response.get("output") or []]
        ttl_ms = max(1, int(self.max_age_s * 1000))
        self._count = await self.link.run(
            lambda: self._put(
                keys=[f"{PREFIX}resp:{response['id']}", f"{PREFIX}responses"],
                args=[record, ttl_ms, response["id"], PREFIX, self.max_entries, *items],
            )
        )

    async def _record(self, response_id: str, owner: str) -> dict[str, Any] | None:
        raw = await self.link.run(lambda: self.redis.get(f"{PREFIX}resp:{response_id}"))
        return _owned(raw, owner)

    async def get_response(self, response_id: str, owner: str) -> Stored | None:
        record = await self._record(response_id, owner)
        if record is None:
            return None
        return Stored(record["response"], record["conversation"], owner)

    async def get_items(self, item_ids: Iterable[str], owner: str) -> dict[str, dict[str, Any]]:
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return {}
        holders = await self.link.run(lambda: self.redis.mget([f"{PREFIX}item:{i}" for i in ids]))
        wanted = sorted({h for h in holders if h})
        if not wanted:
            return {}
        raws = await self.link.run(lambda: self.redis.mget([f"{PREFIX}resp:{r}" for r in wanted]))
        outputs: dict[str, dict[str, Any]] = {}
        for raw in raws:
            record = _owned(raw, owner)
            for item in (record or {}).get("response", {}).get("output") or []:
                outputs[str(item.get("id"))] = item
        return {i: outputs[i] for i in ids if i in outputs}

    async def delete_response(self, response_id: str, owner: str) -> bool:
        record = await self._record(response_id, owner)
        if record is None:
            return False
        items = [f"{PREFIX}item:{i['id']}" for i in record["response"].get("output") or []]

        async def delete() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(f"{PREFIX}resp:{response_id}", f"{PREFIX}items:{response_id}", *items)
                pipe.zrem(f"{PREFIX}responses", response_id)
                await pipe.execute()

        await self.link.run(delete)
        return True

    async def key_view(self, digests: list[str]) -> tuple[int, dict[str, KeyHealth]]:
        async def view() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.incr(f"{PREFIX}turn")
                pipe.expire(f"{PREFIX}turn", TURN_TTL_S)  # (everything written expires)
                for digest in digests:
                    pipe.get(f"{PREFIX}key:{digest}:rest")
                    pipe.pttl(f"{PREFIX}key:{digest}:rest")
                    pipe.exists(f"{PREFIX}key:{digest}:rejected")
                return list(await pipe.execute())

        answers = await self.link.run(view)
        health = {}
        for n, digest in enumerate(digests):
            reason, left_ms, rejected = answers[2 + 3 * n : 5 + 3 * n]
            rest_s = max(0, left_ms) / 1000 if reason is not None else 0.0
            health[digest] = KeyHealth(rest_s, reason or "", bool(rejected))
        return int(answers[0]) - 1, health

    async def rest_key(self, digest: str, seconds: float, reason: str) -> None:
        ms = max(1, int(seconds * 1000))
        await self.link.run(
            lambda: self._rest(keys=[f"{PREFIX}key:{digest}:rest"], args=[ms, reason])
        )

    async def reject_key(self, digest: str) -> None:
        key = f"{PREFIX}key:{digest}:rejected"
        await self.link.run(lambda: self.redis.set(key, "1", ex=REJECTED_TTL_S))

    async def get_upload(self, scope: tuple[str, str]) -> str | None:
        key = f"{PREFIX}upload:{scope[0]}:{scope[1]}"
        found: str | None = await self.link.run(lambda: self.redis.get(key))
        return found

    async def put_upload(self, scope: tuple[str, str], attachment: str) -> None:
        key = f"{PREFIX}upload:{scope[0]}:{scope[1]}"
        await self.link.run(lambda: self.redis.set(key, attachment, ex=UPLOAD_TTL_S))

    def stored_count(self) -> int | None:
        """The deployment's stored responses as of this instance's last store (None: none yet)."""
        return self._count

    async def aclose(self) -> None:
        await self.redis.aclose()


def _owned(raw: str | None, owner: str) -> dict[str, Any] | None:
    """A stored record, if ``owner`` made it (compared in constant time)."""
    if raw is None:
        return None
    record: dict[str, Any] = json.loads(raw)
    if not hmac.compare_digest(str(record.get("owner", "")), owner):
        return None
    return record


def state_line(state: State) -> str:
    """The start-up line naming the store (host and db, never a password)."""
    if isinstance(state, LocalState):
        return "state: in this process (set poe_state_url to share it with other instances)"
    return f"state: shared through {state.describe()} (stored responses, key health, uploads)"


def open_state(url: StateURL | None) -> State:
    return LocalState() if url is None else RedisState(url)
