"""The state interface's contract, run against both implementations: in this process and in a
real Redis server (tests/redisd.py). Then what only Redis can do: fail and come back."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
from redisd import RedisServer

from addon.config import parse_state_url, secret_digest
from addon.keys import MAX_REST_S, KeyPool, retry_after_seconds
from addon.service import owner_of
from addon.state import LocalState, RedisState, State, Unavailable

ALICE, BOB = owner_of("key-a"), owner_of("key-b")


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture(params=["local", "redis"])
def kind(request: pytest.FixtureRequest, server: RedisServer) -> str:
    if request.param == "redis":
        redis.Redis(port=server.port).flushdb()
    return str(request.param)


def run(kind: str, server: RedisServer, body: Callable[[State], Awaitable[Any]]) -> Any:
    """``body`` with a fresh state of ``kind`` (a Redis client belongs to one event loop)."""

    async def main() -> Any:
        state: State = LocalState() if kind == "local" else redis_state(server)
        try:
            return await body(state)
        finally:
            await state.aclose()

    return asyncio.run(main())


def redis_state(server: RedisServer) -> RedisState:
    url = parse_state_url(server.url)
    assert url is not None
    return RedisState(url)


def response(n: int) -> dict[str, Any]:
    output = [{"id": f"msg_{n}", "type": "message"}, {"id": f"fc_{n}", "type": "function_call"}]
    return {"id": f"resp_{n}", "object": "response", "output": output}


# --- stored responses ---------------------------------------------------------------------------


def test_a_stored_response_is_its_owners_alone(kind: str, server: RedisServer) -> None:
    async def body(state: State) -> None:
        conversation = [{"role": "user", "content": "a secret"}]
        await state.put_response(response(1), conversation, ALICE)
        assert await state.get_response("resp_1", BOB) is None
        assert not await state.delete_response("resp_1", BOB)
        assert await state.get_items(["msg_1"], BOB) == {}
        stored = await state.get_response("resp_1", ALICE)
        assert stored is not None
        assert stored.response == response(1) and stored.conversation == conversation
        assert await state.get_items(["fc_1", "msg_1", "nope"], ALICE) == {
            "fc_1": {"id": "fc_1", "type": "function_call"},
            "msg_1": {"id": "msg_1", "type": "message"},
        }
        assert await state.delete_response("resp_1", ALICE)
        assert await state.get_response("resp_1", ALICE) is None
        assert await state.get_items(["msg_1"], ALICE) == {}
        assert not await state.delete_response("resp_1", ALICE)
        assert await state.get_response("resp_never", ALICE) is None

    run(kind, server, body)


def test_responses_expire(kind: str, server: RedisServer) -> None:
    async def body(state: State) -> None:
        state.max_age_s = 0.3
        await state.put_response(response(1), [], ALICE)
        assert await state.get_response("resp_1", ALICE) is not None
        await asyncio.sleep(0.5)
        assert await state.get_response("resp_1", ALICE) is None
        assert await state.get_items(["msg_1"], ALICE) == {}

    run(kind, server, body)


def test_store_keeps_its_size_over_10000_puts(kind: str, server: RedisServer) -> None:
    async def body(state: State) -> None:
        state.max_entries = 100
        for n in range(10_000):
            await state.put_response(response(n), [{"role": "user", "content": str(n)}], ALICE)
        assert state.stored_count() == 100
        assert await state.get_response("resp_9899", ALICE) is None
        assert await state.get_response("resp_9900", ALICE) is not None
        assert await state.get_items(["msg_0", "fc_9899"], ALICE) == {}
        assert list(await state.get_items(["fc_9999"], ALICE)) == ["fc_9999"]
        if isinstance(state, RedisState):  # the item index is bounded with the store
            keys = redis.Redis(port=server.port).keys("*")
            assert len(keys) <= 100 * 4 + 2, len(keys)  # resp, items list, 2 items; + zset, turn

    run(kind, server, body)


# --- key health ----------------------------------------------------------------------------------


def test_key_health_rests_rejects_and_turns(kind: str, server: RedisServer) -> None:
    a, b, c = (secret_digest(k) for k in ("key-a", "key-b", "key-c"))

    async def body(state: State) -> None:
        turn0, view = await state.key_view([a, b, c])
        assert all(h.rest_s == 0 and not h.rejected for h in view.values())
        await state.rest_key(a, 30, "rate-limited")
        await state.rest_key(a, 5, "rate-limited")  # a shorter rest never shortens it
        await state.rest_key(b, 0.2, "out of points")
        await state.reject_key(c)
        turn1, view = await state.key_view([a, b, c])
        assert turn1 == turn0 + 1
        assert 29 < view[a].rest_s <= 30 and view[a].reason == "rate-limited"
        assert 0 < view[b].rest_s <= 0.2 and view[b].reason == "out of points"
        assert view[c].rejected and not view[a].rejected
        await asyncio.sleep(0.3)
        _, view = await state.key_view([b])
        assert view[b].rest_s == 0

    run(kind, server, body)


def test_two_pools_on_one_state_take_turns_and_see_each_others_rests(
    kind: str, server: RedisServer
) -> None:
    """Two instances: one rotation between them, and a key one rests is skipped by the other
    at its very next pick. (With a state each, both would start on the first key.)"""
    keys = ["key-a", "key-b", "key-c"]

    async def body(state: State) -> None:
        one, two = KeyPool(keys, state=state), KeyPool(keys, state=state)
        picks = [await pool.pick() for pool in (one, two, one, two, one, two)]
        assert picks == ["key-a", "key-b", "key-c", "key-a", "key-b", "key-c"]
        await one.cool("key-a", 30, "rate-limited")
        assert [await two.pick() for _ in range(4)].count("key-a") == 0
        await one.reject("key-b")
        assert {await two.pick() for _ in range(3)} == {"key-c"}
        assert "rate-limited" in two.exhausted().message or await two.pick() == "key-c"
        assert two.status()[1]["state"] == "rejected"

    run(kind, server, body)


# --- uploads -------------------------------------------------------------------------------------


def test_uploads_by_key_and_content(kind: str, server: RedisServer) -> None:
    mine, theirs = (secret_digest("key-a"), "d1"), (secret_digest("key-b"), "d1")

    async def body(state: State) -> None:
        assert await state.get_upload(mine) is None
        await state.put_upload(mine, '{"url": "https://cdn/1"}')
        assert await state.get_upload(mine) == '{"url": "https://cdn/1"}'
        assert await state.get_upload(theirs) is None  # another key uploads its own

    run(kind, server, body)


# --- Redis only: nothing in clear, outages -----------------------------------------------------


def test_no_key_or_token_reaches_redis(server: RedisServer) -> None:
    redis.Redis(port=server.port).flushdb()

    async def body(state: State) -> None:
        pool = KeyPool(["poe-secret-key-1", "poe-secret-key-2"], state=state)
        await pool.cool("poe-secret-key-1", 30, "rate-limited")
        await pool.reject("poe-secret-key-2")
        await state.put_upload((secret_digest("poe-secret-key-1"), "d"), "{}")
        await state.put_response(response(1), [], owner_of("client-token-secret"))

    run("redis", server, body)
    client = redis.Redis(port=server.port)
    dump = b" ".join(k + b"=" + (client.dump(k) or b"") for k in client.keys("*"))
    assert b"poe-secret" not in dump and b"client-token-secret" not in dump
    assert secret_digest("poe-secret-key-1").encode() in dump  # named by digest


def test_an_outage_is_one_warning_a_quick_refusal_and_then_sharing_again(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="addon.state")

    async def body(state: State) -> None:
        await state.put_response(response(1), [], ALICE)
        server.stop()
        try:
            for _ in range(5):
                started = time.monotonic()
                with pytest.raises(Unavailable):
                    await state.get_response("resp_1", ALICE)
                assert time.monotonic() - started < 2  # bounded, not a hang
            started = time.monotonic()
            for _ in range(100):  # meanwhile the store is not asked again: no wait at all
                with pytest.raises(Unavailable):
                    await state.key_view(["x"])
            assert time.monotonic() - started < 0.5
        finally:
            server.start()
        await asyncio.sleep(1.1)  # the next try after an outage
        await state.put_response(response(2), [], ALICE)
        assert await state.get_response("resp_2", ALICE) is not None

    run("redis", server, body)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("cannot be reached" in line for line in lines) == 1, lines
    assert sum("is back; sharing again" in line for line in lines) == 1, lines
    assert all("password" not in line for line in lines)


def test_state_url_is_judged_and_shown_without_its_password() -> None:
    from addon.config import ConfigError

    url = parse_state_url("redis://:s3cret@cache.internal:6380/2")
    assert url is not None and url.describe() == "redis://cache.internal:6380/2"
    assert "s3cret" not in repr(url)
    assert parse_state_url("") is None
    tls = parse_state_url("rediss://cache", password="from-env")
    assert tls is not None and tls.describe() == "rediss://cache:6379/0"
    assert tls.password == "from-env"
    for bad in ("http://cache:6379", "redis://", "redis://:pw@cache/db1", "redis://h/0?x=1"):
        with pytest.raises(ConfigError) as caught:
            parse_state_url(bad)
        assert "pw" not in str(caught.value) and "redis://127.0.0.1:6379/0" in str(caught.value)


def test_a_retry_after_past_any_clock_rests_a_key_a_day_at_most(
    kind: str, server: RedisServer
) -> None:
    """(A sibling: "inf" made the exhausted message's ceil() raise, and Redis's expiry cannot
    hold it.) What a Retry-After asks is bounded before any state sees it."""
    assert retry_after_seconds("99999999999") == MAX_REST_S
    assert retry_after_seconds("inf") is None and retry_after_seconds("nan") is None
    assert retry_after_seconds("1e400") is None and retry_after_seconds("-5") == 0.0

    async def body(state: State) -> None:
        pool = KeyPool(["key-a"], state=state)
        await pool.cool("key-a", retry_after_seconds("99999999999") or 0, "rate-limited")
        assert await pool.pick() is None
        assert "try again in 86400 s" in pool.exhausted().message

    run(kind, server, body)


def test_state_url_mistakes_name_the_environment_variable_for_the_plain_server() -> None:
    from addon.config import ENV, ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_state_url("localhost:6379", ENV)
    assert str(caught.value).startswith("POE_STATE_URL='localhost:6379' is not a Redis URL")
    assert "POE_STATE_URL=redis://127.0.0.1:6379/0" in str(caught.value)


def test_a_silent_store_costs_one_timeout_not_one_per_request() -> None:
    """A store that accepts connections and never answers (a hung server, a black hole): the
    first call waits the bounded timeout, the calls after it do not wait at all."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(200)  # connections complete in the backlog; nothing is ever read
        url = parse_state_url(f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        assert url is not None

        async def body() -> tuple[float, float]:
            state = RedisState(url, timeout=0.3)
            try:
                started = time.monotonic()
                with pytest.raises(Unavailable):
                    await state.get_response("resp_1", ALICE)
                first = time.monotonic() - started
                started = time.monotonic()
                for _ in range(20):
                    with pytest.raises(Unavailable):
                        await state.key_view(["x"])
                return first, time.monotonic() - started
            finally:
                await state.aclose()

        first, then = asyncio.run(body())
    assert 0.25 < first < 1.5
    assert then < 0.2


def test_everything_written_to_redis_expires(server: RedisServer) -> None:
    """So a Redis with maxmemory and volatile-ttl stays within its memory."""
    redis.Redis(port=server.port).flushdb()

    async def body(state: State) -> None:
        pool = KeyPool(["key-a", "key-b"], state=state)
        await pool.pick()
        await pool.cool("key-a", 30, "rate-limited")
        await pool.reject("key-b")
        await state.put_upload((secret_digest("key-a"), "d"), "{}")
        await state.put_response(response(1), [], ALICE)

    run("redis", server, body)
    client = redis.Redis(port=server.port)
    keys = client.keys("*")
    assert len(keys) == 9  # turn, 2 key states, upload, response, its items list, 2 items, zset
    assert all(client.ttl(k) > 0 for k in keys), {k: client.ttl(k) for k in keys}
