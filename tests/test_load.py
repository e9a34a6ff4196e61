"""Load suite: 300 concurrent requests, streamed and not, a tenth of them faulty, each with a
unique marker, three rounds: every client gets exactly its own answer, memory comes back to
its baseline and nothing is left open."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, echo, error, sleep, text
from figures import record
from harness import Mitmdump, assert_no_traceback

CONCURRENT = 300
ROUNDS = 3
ECHO, FAULTY = "Load-Echo", "Load-Faulty"


@pytest.fixture(scope="module")
def load_proxy(fake_poe: FakePoe) -> Iterator[Mitmdump]:
    # Answers take ~2 s, so all 300 are in flight at once while their starts are spread
    # over ~1 s (mitmproxy's listening socket has asyncio's default backlog of 100: a burst
    # of 300 simultaneous connects overflows it).
    fake_poe.script(ECHO, [sleep(1.0), text("echo: "), sleep(1.0), echo()])
    fake_poe.script(FAULTY, [sleep(1.0), text("partial "), error("Internal server error")])
    with Mitmdump(options=poe_options(fake_poe, poe_api_key=POE_KEY), regular=False) as m:
        yield m


async def one(client: httpx.AsyncClient, i: int) -> tuple[str, str, bool]:
    """(kind of outcome, the marker sent, whether the answer was this request's own)."""
    marker = uuid.uuid4().hex
    faulty = i % 10 == 0
    stream = i % 2 == 0
    body = {
        "model": FAULTY if faulty else ECHO,
        "messages": [{"role": "user", "content": marker}],
        "stream": stream,
    }
    await asyncio.sleep(i * 0.003)
    r = await client.post("/v1/chat/completions", json=body)
    if not stream:
        if faulty:
            return ("error", marker, r.status_code == 502)
        content = r.json()["choices"][0]["message"]["content"]
        return ("answer", marker, content == f"echo: {marker}")
    text_, failed = "", False
    for block in r.text.split("\n\n"):
        if not block.startswith("data: ") or block == "data: [DONE]":
            continue
        chunk = json.loads(block[6:])
        if "error" in chunk:
            failed = True
        elif chunk["choices"]:
            text_ += chunk["choices"][0]["delta"].get("content") or ""
    if faulty:
        return ("error", marker, failed and text_ == "partial ")
    return ("answer", marker, not failed and text_ == f"echo: {marker}")


async def round_(m: Mitmdump) -> tuple[Counter[str], float]:
    limits = httpx.Limits(max_connections=CONCURRENT)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{m.reverse_port}", trust_env=False, timeout=60, limits=limits
    ) as client:
        started = time.monotonic()
        results = await asyncio.gather(*(one(client, i) for i in range(CONCURRENT)))
        took = time.monotonic() - started
    outcome: Counter[str] = Counter()
    for kind, _, own in results:
        outcome[f"{kind}s" if own else f"wrong {kind}s"] += 1
    return outcome, took


def test_load_rounds(load_proxy: Mitmdump, fake_poe: FakePoe) -> None:
    asyncio.run(round_(load_proxy))  # warm-up: caches, pools, the tokenizer
    baseline = float(load_proxy.status()["rss_mb"])  # type: ignore[arg-type]
    totals: Counter[str] = Counter()
    seconds = []
    for _ in range(ROUNDS):
        outcome, took = asyncio.run(round_(load_proxy))
        totals.update(outcome)
        seconds.append(round(took, 2))
        assert outcome == Counter({"answers": CONCURRENT * 9 // 10, "errors": CONCURRENT // 10}), (
            outcome
        )
    assert fake_poe.wait_for(lambda: load_proxy.status()["in_flight"] == 0, 10)
    # mitmproxy's own connection tasks take a moment to wind down after 300 clients leave
    fake_poe.wait_for(lambda: int(load_proxy.status()["asyncio_tasks"]) < 20, 15)  # type: ignore[call-overload]
    status = load_proxy.status()
    after = float(status["rss_mb"])  # type: ignore[arg-type]
    record(
        "load",
        {
            "requests": CONCURRENT * ROUNDS,
            "concurrent": CONCURRENT,
            "faulty": totals["errors"],
            "outcomes": dict(totals),
            "seconds_per_round": seconds,
            "rss_mb_baseline": baseline,
            "rss_mb_after": after,
            "in_flight_after": status["in_flight"],
            "asyncio_tasks_after": status["asyncio_tasks"],
        },
    )
    assert after <= baseline * 1.10, (baseline, after)
    assert status["awaiting_app"] == 0
    assert int(status["asyncio_tasks"]) < 20, status  # type: ignore[call-overload]
    assert_no_traceback(load_proxy.output)
