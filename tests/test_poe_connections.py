"""Connections to Poe: reused between queries, never held by a server that keeps a body open,
and a query lost on a connection the server closed is resent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from fake_poe import FakePoe, no_done, raw, sleep, text
from fastapi_poe.types import ProtocolMessage, QueryRequest
from harness import Mitmdump

from addon.poe import PoeClient, PoeError

USER = [{"role": "user", "content": "hi"}]
QUERIES = 8


@pytest.mark.parametrize("stream", [False, True])
def test_sequential_queries_reuse_one_poe_connection(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    # fastapi-poe stops reading at "done"; without finishing the body, httpx drops the
    # connection and every query opens a new one.
    fake_poe.script(bot, [text("Hello"), text(" world")])
    with proxy.http() as http:
        for _ in range(QUERIES):
            r = http.post(
                "/v1/chat/completions", json={"model": bot, "messages": USER, "stream": stream}
            )
            assert r.status_code == 200 and "world" in r.text
    clients = {rec.client for rec in fake_poe.requests_for(bot)}
    assert len(fake_poe.requests_for(bot)) == QUERIES
    assert len(clients) <= 2, f"{QUERIES} queries over {len(clients)} connections"


@pytest.mark.parametrize("stream", [False, True])
def test_a_body_left_open_after_done_neither_delays_the_answer_nor_holds_the_connection(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    fake_poe.script(bot, [text("Hello"), raw("event: done\ndata: {}\n\n"), sleep(30), no_done()])
    with proxy.http() as http:
        assert http.get("/v1/models").status_code == 200  # a warm proxy: timing is the point
        started = time.monotonic()
        r = http.post(
            "/v1/chat/completions", json={"model": bot, "messages": USER, "stream": stream}
        )
        took = time.monotonic() - started
    assert r.status_code == 200 and "Hello" in r.text
    assert took < 1.0
    # The addon gives up on the rest of the body after a bounded wait (2 s).
    assert fake_poe.wait_for(lambda: fake_poe.requests_for(bot)[0].disconnected is not None, 5)


# --- a reused connection the server closed: resent only when Poe never answered -----------------

ANSWER = b'event: text\ndata: {"text": "hi"}\n\nevent: done\ndata: {}\n\n'


def mocked(handler: Callable[[httpx.Request], Awaitable[httpx.Response]]) -> PoeClient:
    client = PoeClient("http://poe.test/bot/")
    client.sessions = [
        httpx.AsyncClient(transport=httpx.MockTransport(handler), event_hooks=s.event_hooks)
        for s in client.sessions
    ]
    return client


def query() -> QueryRequest:
    message = ProtocolMessage(role="user", content="hello")
    return QueryRequest(
        version="1.0", type="query", query=[message], user_id="u", conversation_id="c",
        message_id="m",
    )  # fmt: skip


async def texts(client: PoeClient) -> list[str]:
    try:
        return [event.text async for event in client.stream(query(), "Bot", "key")]
    finally:
        await client.aclose()


def test_a_query_lost_before_any_response_is_resent_once() -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:  # the server closed the idle connection as the query went out
            raise httpx.ReadError("connection reset by peer", request=request)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=ANSWER)

    assert asyncio.run(texts(mocked(handler))) == ["hi"]
    assert calls == 2


def test_a_query_lost_after_the_response_began_is_not_resent() -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1

        async def body() -> AsyncIterator[bytes]:
            raise httpx.ReadError("connection reset by peer", request=request)
            yield b""  # an async generator

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    with pytest.raises(PoeError) as info:
        asyncio.run(texts(mocked(handler)))
    assert info.value.failure.transport is not None and "ReadError" in info.value.failure.transport
    assert calls == 1


def test_concurrent_queries_spread_over_the_pools_and_one_at_a_time_stays_in_one() -> None:
    # httpcore's pool walks all its connections on every request start and end: one pool of
    # 64 streams cost ~11% of mitmdump's CPU. Each query goes to the least busy pool.
    release = asyncio.Event()
    seen: list[int] = []

    def pool_of(index: int) -> Callable[[httpx.Request], Awaitable[httpx.Response]]:
        async def handler(request: httpx.Request) -> httpx.Response:
            seen.append(index)
            await release.wait()
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=ANSWER
            )

        return handler

    async def run() -> tuple[list[int], list[int]]:
        client = PoeClient("http://poe.test/bot/")
        client.sessions = [
            httpx.AsyncClient(transport=httpx.MockTransport(pool_of(i)), event_hooks=s.event_hooks)
            for i, s in enumerate(client.sessions)
        ]
        try:
            one_at_a_time = []
            release.set()
            for _ in range(3):
                assert [e.text async for e in client.stream(query(), "Bot", "key")] == ["hi"]
            one_at_a_time, seen[:] = list(seen), []
            release.clear()
            n = 2 * PoeClient.POOLS
            tasks = [
                asyncio.create_task(anext(client.stream(query(), "Bot", "key"))) for _ in range(n)
            ]
            while len(seen) < n:
                await asyncio.sleep(0.01)
            release.set()
            await asyncio.gather(*tasks)
            return one_at_a_time, list(seen)
        finally:
            await client.aclose()

    one_at_a_time, concurrent = asyncio.run(run())
    assert one_at_a_time == [0, 0, 0]
    assert sorted(concurrent) == sorted(list(range(PoeClient.POOLS)) * 2)
