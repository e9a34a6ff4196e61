"""State over time: 10,000 requests of each kind leave the proxy's state as small as they
found it (per-flow maps, stats keys, caches, tasks, stores), through the real mitmdump and in
the plain server's app.

Bulk requests go out over raw asyncio httpx clients (the openai SDK would dominate the time).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, error, sleep, text
from harness import Mitmdump

from addon.config import fingerprint
from addon.standalone import create
from addon.status import status as status_report

# Requests of each kind: 10,000 where a request costs well under a millisecond (the plain
# server's app in-process, no Poe query); 500 through mitmdump or to Poe, where each costs
# 4-12 ms on a shared machine (the suite's time). Any per-request leak shows as hundreds of
# entries against bounds of zero or a fixed few. SOAK_N=10000 runs every kind 10,000 times
# (19 minutes on 2 busy cores; every bound held).
N = int(os.environ.get("SOAK_N", "10000"))
N_SLOW = int(os.environ.get("SOAK_N", "500"))
CONCURRENCY = 32
CHAT = "/v1/chat/completions"
ORIGIN = {"origin": "http://localhost:3210"}
SOAK_BOT = "Soak-" + uuid.uuid4().hex[:8]  # answers "soaked" (scripted by the fixtures)


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


Send = Callable[[httpx.AsyncClient, int], Awaitable[None]]


async def flood(client: httpx.AsyncClient, send: Send, count: int = N) -> float:
    """``count`` requests, CONCURRENCY at a time; returns the seconds taken."""
    started = time.monotonic()
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            await send(client, i)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.monotonic() - started


def expect(status: int) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        assert response.status_code == status, response.text

    return check


# --- the kinds of request, each a send(client, i) -----------------------------------------------


async def preflight(client: httpx.AsyncClient, i: int) -> None:
    response = await client.options(
        CHAT,
        headers={
            **ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == "*"


async def options(client: httpx.AsyncClient, i: int) -> None:
    """OPTIONS that is no CORS preflight (no Origin): the app's own catch-all answers it."""
    response = await client.options(f"/v1/{uuid.uuid4().hex}")
    assert response.status_code == 204, response.text


async def unknown_path(client: httpx.AsyncClient, i: int) -> None:
    response = await client.get(f"/v1/no-such-thing/{uuid.uuid4().hex}")
    assert response.status_code == 404, response.text


async def stored_response(client: httpx.AsyncClient, i: int) -> None:
    response = await client.get(f"/v1/responses/resp_{uuid.uuid4().hex}")
    assert response.status_code == 404, response.text


async def flow_header(client: httpx.AsyncClient, i: int) -> None:
    """A client sending the header the addon tags its flows with (the plain server must
    ignore it; behind mitmproxy the addon's own tag replaces it)."""
    response = await client.post(
        CHAT, json=chat(SOAK_BOT), headers={"x-poe-openai-flow": uuid.uuid4().hex}
    )
    assert response.status_code == 200, response.text


async def bad_json(client: httpx.AsyncClient, i: int) -> None:
    response = await client.post(
        CHAT, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text


def answered(bot: str, stream: bool) -> Send:
    async def send(client: httpx.AsyncClient, i: int) -> None:
        response = await client.post(CHAT, json=chat(bot, stream=stream))
        assert response.status_code == 200, response.text
        assert b"soaked" in response.content

    return send


def stored(bot: str, ids: list[str]) -> Send:
    """A Responses API answer, kept for previous_response_id (the store is capped)."""

    async def send(client: httpx.AsyncClient, i: int) -> None:
        response = await client.post("/v1/responses", json={"model": bot, "input": "hi"})
        assert response.status_code == 200, response.text
        assert b"soaked" in response.content
        ids.append(response.json()["id"])

    return send


def get_stored(ids: list[str]) -> Send:
    """GET of the responses still stored (each id its own URL)."""

    async def send(client: httpx.AsyncClient, i: int) -> None:
        response = await client.get(f"/v1/responses/{ids[-1 - i % 50]}")
        assert response.status_code == 200, response.text

    return send


def failing(bot: str) -> Send:
    """Poe fails the query (in-band error after the stream began): a 5xx for the client."""

    async def send(client: httpx.AsyncClient, i: int) -> None:
        response = await client.post(CHAT, json=chat(bot, stream=i % 2 == 1))
        if i % 2:  # a stream: the error arrives in it
            assert response.status_code in (200, 502), response.text
            assert b'"error"' in response.content
        else:
            assert response.status_code == 502, response.text

    return send


def picture(bot: str) -> Send:
    """A different picture each time: an upload each (the upload cache is capped)."""

    async def send(client: httpx.AsyncClient, i: int) -> None:
        url = "data:image/png;base64," + base64.b64encode(uuid.uuid4().bytes).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}]
        body = {"model": bot, "messages": [{"role": "user", "content": content}]}
        response = await client.post(CHAT, json=body)
        assert response.status_code == 200, response.text

    return send


def passthrough_key(bot: str) -> Send:
    """Every request with its own client key (pass-through: Poe refuses all but one)."""

    async def send(client: httpx.AsyncClient, i: int) -> None:
        key = POE_KEY if i % 10 == 0 else f"sk-client-{uuid.uuid4().hex}"
        response = await client.post(
            CHAT, json=chat(bot), headers={"authorization": f"Bearer {key}"}
        )
        assert response.status_code == (200 if key == POE_KEY else 401), response.text

    return send


def leaving(bot: str) -> Send:
    """A client that reads the start of a stream and hangs up."""

    async def send(client: httpx.AsyncClient, i: int) -> None:
        async with client.stream("POST", CHAT, json=chat(bot, stream=True)) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                if b"soaked" in chunk:
                    break

    return send


# --- what must stay bounded ----------------------------------------------------------------


def assert_bounded(state: dict[str, Any], baseline: dict[str, Any]) -> None:
    assert state["awaiting_app"] == 0, state  # routed
    assert state["in_flight"] == 0, state  # running
    assert state["flow_views_pending"] == 0, state  # flow_info
    assert state["cancelling"] == 0, state  # gone
    assert len(state["counts"]) <= 40, sorted(state["counts"])  # stats keys: a fixed set
    assert state["responses_stored"] <= 50, state
    assert state["uploads_cached"] <= 512, state
    assert len(state["keys"]) == len(baseline["keys"]), state  # the key pool
    # A few tasks come and go (connections closing); none per request.
    assert state["asyncio_tasks"] <= baseline["asyncio_tasks"] + 10, state["asyncio_task_kinds"]
    assert state.get("stream_notices_expected", 0) == 0, state


def settle(read: Callable[[], dict[str, Any]], ready: Callable[[dict[str, Any]], bool]) -> Any:
    """The state once in-flight work has wound down (clients that left, closing streams)."""
    deadline = time.monotonic() + 15
    while True:
        state = read()
        if ready(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def idle_since(baseline: dict[str, Any] | None) -> Callable[[dict[str, Any]], bool]:
    """Nothing in flight, and the connections of the flood closed."""

    def ready(state: dict[str, Any]) -> bool:
        if state["in_flight"] or state["awaiting_app"] or state["flow_views_pending"]:
            return False
        return baseline is None or state["asyncio_tasks"] <= baseline["asyncio_tasks"] + 10

    return ready


idle = idle_since(None)


# --- through mitmdump ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def soak_proxy(fake_poe: FakePoe) -> Iterator[Mitmdump]:
    fake_poe.script(SOAK_BOT, [text("soaked")])
    opts = poe_options(fake_poe, poe_response_store_size="50")
    with Mitmdump(options=opts, env={"POE_API_KEY": POE_KEY}, regular=False) as m:
        yield m


@pytest.fixture(scope="module")
def soak_passthrough(fake_poe: FakePoe) -> Iterator[Mitmdump]:
    with Mitmdump(options=poe_options(fake_poe), regular=False) as m:
        yield m


def cpu_seconds(proxy: Mitmdump) -> float:
    """mitmdump's CPU time so far (Linux), for the figures the test prints."""
    assert proxy.proc is not None
    try:
        with open(f"/proc/{proxy.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / 100


def through(proxy: Mitmdump, send: Send, count: int = N_SLOW, **headers: str) -> float:
    async def main() -> float:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{proxy.reverse_port}",
            trust_env=False,
            timeout=60,
            headers=headers,
            limits=httpx.Limits(max_connections=CONCURRENCY),
        ) as client:
            return await flood(client, send, count)

    return asyncio.run(main())


def soaked_bot(fake_poe: FakePoe) -> str:
    bot = "Soak-" + uuid.uuid4().hex[:8]
    fake_poe.script(bot, [text("soaked")])
    return bot


MITMDUMP_KINDS = [
    "preflight",
    "options",
    "unknown_path",
    "stored_response",
    "flow_header",
    "bad_json",
]


@pytest.mark.parametrize("kind", MITMDUMP_KINDS)
def test_mitmdump_state_stays_bounded(soak_proxy: Mitmdump, fake_poe: FakePoe, kind: str) -> None:
    send: Send = globals()[kind]
    baseline = settle(soak_proxy.status, idle)
    cpu = cpu_seconds(soak_proxy)
    seconds = through(soak_proxy, send, authorization="Bearer sk-anything")
    cpu = cpu_seconds(soak_proxy) - cpu
    state = settle(soak_proxy.status, idle_since(baseline))
    print(f"{kind}: {N_SLOW} in {seconds:.1f} s, mitmdump CPU {cpu:.1f} s; {json.dumps(state)}")
    assert_bounded(state, baseline)


def test_mitmdump_answers_errors_and_leaving_clients_stay_bounded(
    soak_proxy: Mitmdump, fake_poe: FakePoe
) -> None:
    bot = soaked_bot(fake_poe)
    slow = "Soak-slow-" + uuid.uuid4().hex[:8]
    fake_poe.script(slow, [text("soaked"), sleep(30)])
    baseline = settle(soak_proxy.status, idle)
    for send in (answered(bot, stream=False), answered(bot, stream=True), leaving(slow)):
        seconds = through(soak_proxy, send, authorization="Bearer sk-anything")
        print(f"{N_SLOW} requests in {seconds:.1f} s")
    state = settle(soak_proxy.status, idle_since(baseline))
    print(json.dumps(state))
    assert state["counts"].get("client left", 0) >= N_SLOW * 0.9
    assert_bounded(state, baseline)


def test_mitmdump_many_client_keys_stay_bounded(
    soak_passthrough: Mitmdump, fake_poe: FakePoe
) -> None:
    bot = soaked_bot(fake_poe)
    baseline = settle(soak_passthrough.status, idle)
    seconds = through(soak_passthrough, passthrough_key(bot))
    state = settle(soak_passthrough.status, idle_since(baseline))
    print(f"{N_SLOW} distinct keys in {seconds:.1f} s; state {json.dumps(state)}")
    assert_bounded(state, baseline)


# --- the plain server, in-process ----------------------------------------------------------


def test_plain_server_state_stays_bounded(fake_poe: FakePoe) -> None:
    bot = soaked_bot(fake_poe)
    fake_poe.script(SOAK_BOT, [text("soaked")])
    broken = "Soak-broken-" + uuid.uuid4().hex[:8]
    fake_poe.script(broken, [error("Internal server error", allow_retry=False)])
    app = create(
        {
            "POE_API_KEY": POE_KEY,
            "POE_BASE_URL": fake_poe.base_url,
            "POE_UPLOAD_URL": fake_poe.upload_url,
        }
    )
    service = app.state.service
    service.state.responses.max_entries = 50
    service.poe.UPLOAD_CACHE_SIZE = 20

    def read() -> dict[str, Any]:
        return status_report(service)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers={"authorization": "Bearer x"}
        ) as client:
            service.load_tokenizer()
            await service.tokenizer_loaded()
            baseline = read()
            ids: list[str] = []
            cheap = [preflight, options, unknown_path, stored_response, bad_json]
            to_poe = [flow_header, answered(bot, stream=False), answered(bot, stream=True)]
            runs = [*((s, N) for s in cheap), *((s, N_SLOW) for s in to_poe)]
            runs += [(stored(bot, ids), 300), (get_stored(ids), N), (picture(bot), 100)]
            runs += [(failing(broken), N_SLOW)]
            for send, count in runs:
                seconds = await flood(client, send, count)
                print(f"{getattr(send, '__name__', send)}: {count} in {seconds:.1f} s")
            await asyncio.sleep(0.1)
            state = read()
            print(json.dumps(state))
            assert not service.flow_info and not service.routed and not service.running
            assert state["uploads_cached"] == 20 and not service.poe._uploading
            assert_bounded(state, baseline)
        await service.poe.aclose()

    asyncio.run(main())


def test_fingerprint_keeps_no_reference_to_the_secret() -> None:
    # A cache keyed by the raw key would keep every client's key in memory.
    secret = "sk-" + uuid.uuid4().hex
    before = sys.getrefcount(secret)
    tag = fingerprint(secret)
    assert sys.getrefcount(secret) == before
    assert tag == fingerprint("sk-" + secret[3:]) and tag.startswith("key#")


def test_response_store_is_bounded_in_bytes_too(fake_poe: FakePoe) -> None:
    """Each stored conversation can hold a whole request body (pictures as data: URLs): a
    count bound alone would let 1,000 of them hold gigabytes."""
    bot = soaked_bot(fake_poe)
    app = create(
        {
            "POE_API_KEY": POE_KEY,
            "POE_BASE_URL": fake_poe.base_url,
            "POE_UPLOAD_URL": fake_poe.upload_url,
        }
    )
    service = app.state.service
    service.state.responses.max_bytes = 2 * 2**20
    page = "log line " * 25_000  # 225 KB of input

    async def send(client: httpx.AsyncClient, i: int) -> None:
        response = await client.post("/v1/responses", json={"model": bot, "input": page})
        assert response.status_code == 200, response.text

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers={"authorization": "Bearer x"}
        ) as client:
            await flood(client, send, 100)
        state = status_report(service)
        print(json.dumps(state))
        assert 0 < state["responses_stored_mb"] <= 2, state
        assert 5 <= state["responses_stored"] < 10, state  # the newest that fit
        await service.poe.aclose()

    asyncio.run(main())
