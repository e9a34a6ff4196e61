"""Cancellation suite: 50 streams closed by their clients, over HTTP/1.1 and over HTTP/2 (one
connection, each stream reset); every Poe request must be dropped within 100 ms of its client
closing, and nothing may be left behind in the proxy."""

from __future__ import annotations

import asyncio
import json
import ssl
import statistics
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, sleep, text
from figures import record
from harness import Mitmdump

STREAMS = 50
LIMIT_S = 0.100
FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="module")
def cancel_proxy(fake_poe: FakePoe) -> Iterator[Mitmdump]:
    with Mitmdump(options=poe_options(fake_poe, poe_api_key=POE_KEY), regular=False) as m:
        yield m
    record("cancellation", FIGURES)


async def open_and_close(client: httpx.AsyncClient, url: str, bot: str, i: int) -> float:
    """Start a stream, read until its first words, keep it open a while (all 50 are open at
    once), close it; the time it was closed. Closing times are spread over a second."""
    body = {"model": bot, "messages": [{"role": "user", "content": f"n{i}"}], "stream": True}
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()  # kept: finalising it would close the stream at once
        async for line in lines:
            if '"content":"start"' in line:
                break
        await asyncio.sleep(1.0 + i * 0.02)
        closed = time.monotonic()
        await lines.aclose()  # the client closes its stream now
    return closed


async def h2_streams(m: Mitmdump, bot: str) -> list[float]:
    """HTTP/2 with the h2 library itself (httpx cannot reset a single stream): 50 streams on
    one connection, each reset with RST_STREAM at its own time; the reset times."""
    import h2.config
    import h2.connection
    import h2.events

    context = ssl.create_default_context(cafile=str(m.ca_file))
    context.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", m.reverse_port, ssl=context, server_hostname="api.openai.com"
    )
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    started: dict[int, asyncio.Event] = {}
    index: dict[int, int] = {}
    for i in range(STREAMS):
        sid = conn.get_next_available_stream_id()
        body = json.dumps(
            {"model": bot, "messages": [{"role": "user", "content": f"n{i}"}], "stream": True}
        ).encode()
        conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":path", "/v1/chat/completions"),
                (":scheme", "https"),
                (":authority", "api.openai.com"),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
            ],
        )
        conn.send_data(sid, body, end_stream=True)
        started[sid], index[sid] = asyncio.Event(), i
    writer.write(conn.data_to_send())

    async def read() -> None:
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if b'"content":"start"' in event.data and event.stream_id in started:
                        started[event.stream_id].set()
            writer.write(conn.data_to_send())

    reader_task = asyncio.create_task(read())
    resets = [0.0] * STREAMS

    async def reset(sid: int) -> None:
        await started[sid].wait()
        await asyncio.sleep(1.0 + index[sid] * 0.02)
        resets[index[sid]] = time.monotonic()
        conn.reset_stream(sid)
        writer.write(conn.data_to_send())

    await asyncio.wait_for(asyncio.gather(*(reset(sid) for sid in started)), 30)
    await asyncio.sleep(0.3)
    reader_task.cancel()
    writer.close()
    return resets


def run(m: Mitmdump, fake: FakePoe, bot: str, http2: bool) -> dict[str, Any]:
    fake.script(bot, [text("start")] + [s for _ in range(60) for s in (sleep(0.5), text("."))])

    async def http1() -> list[float]:
        url = f"{m.reverse_url}/chat/completions"
        limits = httpx.Limits(max_connections=STREAMS)
        async with httpx.AsyncClient(trust_env=False, timeout=30, limits=limits) as client:
            return list(
                await asyncio.gather(*(open_and_close(client, url, bot, i) for i in range(STREAMS)))
            )

    closed = asyncio.run(h2_streams(m, bot) if http2 else http1())
    requests = fake.requests_for(bot)
    assert len(requests) == STREAMS
    assert fake.wait_for(lambda: all(r.disconnected for r in requests), 5)
    by_message = {r.body["query"][-1]["content"]: r for r in requests}
    delays = [
        by_message[f"n{i}"].disconnected - closed[i]  # type: ignore[operator]
        for i in range(STREAMS)
    ]
    return {
        "streams": STREAMS,
        "dropped": sum(1 for r in requests if r.disconnected and not r.finished),
        "median_ms": round(statistics.median(delays) * 1000, 1),
        "max_ms": round(max(delays) * 1000, 1),
        "min_ms": round(min(delays) * 1000, 1),
    }


@pytest.mark.parametrize("http2", [False, True], ids=["HTTP/1.1", "HTTP/2"])
def test_clients_closing_streams_drop_their_poe_queries(
    cancel_proxy: Mitmdump, fake_poe: FakePoe, bot: str, http2: bool
) -> None:
    figures = run(cancel_proxy, fake_poe, bot, http2)
    FIGURES["HTTP/2" if http2 else "HTTP/1.1"] = figures
    assert figures["dropped"] == STREAMS
    assert figures["min_ms"] >= 0, figures  # none dropped before its client closed
    assert figures["max_ms"] <= LIMIT_S * 1000, figures
    # nothing left behind: no request in flight, no key awaiting the app, tasks back to idle
    assert fake_poe.wait_for(lambda: cancel_proxy.status()["in_flight"] == 0, 5)
    fake_poe.wait_for(lambda: int(cancel_proxy.status()["asyncio_tasks"]) < 20, 10)  # type: ignore[call-overload]
    status = cancel_proxy.status()
    assert status["awaiting_app"] == 0
    assert int(status["asyncio_tasks"]) < 20, status  # type: ignore[call-overload]
