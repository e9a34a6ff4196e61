"""Shared state figures: the Responses chain with the in-process store vs Redis on loopback, and
requests/s of `uvicorn --workers 2` vs one worker (both sharing Redis).

    .venv/bin/python bench/shared_state.py [--chains 60] [--seconds 10] [--rounds 3]

Everything runs side by side in one run (the machine's speed drifts between runs): the stand-in
Poe server (bench/poe_server.py) in its own process, a redis-server on a free loopback port
with nothing saved, and the plain servers. Prints medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCH))

import rawhttp  # noqa: E402
from harness import free_port  # noqa: E402
from redisd import RedisServer  # noqa: E402
from run import CLIENT_HEADERS, KEY, PoeServer, pct  # noqa: E402


@contextmanager
def plain_server(poe: PoeServer, state_url: str, workers: int = 0) -> Iterator[str]:
    """The plain server (`python -m addon serve`, or uvicorn with workers); yields its URL."""
    port = free_port()
    if workers:
        args = ["-m", "uvicorn", "addon.standalone:create", "--factory", "--no-access-log"]
        args += ["--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    else:
        args = ["-m", "addon", "serve", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("POE_")}
    env.update(POE_API_KEY=KEY, POE_BASE_URL=poe.base_url, POE_STATE_URL=state_url)
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/v1/models", timeout=1, trust_env=False)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the plain server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def chain_turns(client: httpx.Client, url: str, turns: int) -> list[float]:
    """One Responses conversation; each turn's latency in ms (the first only writes the
    store, the others read the previous response and write their own)."""
    times, previous = [], None
    for n in range(turns):
        body = {"model": "Hi", "input": f"turn {n}", "previous_response_id": previous}
        started = time.perf_counter()
        answer = client.post(url + "/v1/responses", json=body)
        times.append((time.perf_counter() - started) * 1000)
        answer.raise_for_status()
        previous = answer.json()["id"]
    return times


def chain_latency(poe: PoeServer, redis_url: str, chains: int) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {"in-process": [], "redis": []}
    with (
        plain_server(poe, "") as local,
        plain_server(poe, redis_url) as shared,
        httpx.Client(trust_env=False, timeout=30) as client,
    ):
        for url in (local, shared):
            chain_turns(client, url, 5)  # warm up (token tables, connections)
        for _ in range(chains):  # alternating, so drift hits both alike
            found["in-process"] += chain_turns(client, local, 5)[1:]
            found["redis"] += chain_turns(client, shared, 5)[1:]
    return found


async def throughput(url: str, seconds: float, concurrency: int) -> float:
    """Non-streamed chat completions per second over ``concurrency`` keep-alive connections
    for ``seconds`` (bench/rawhttp.py: a load generator that leaves the cores to the servers;
    with workers, each connection lands on one of them as it is accepted)."""
    body = json.dumps({"model": "Hi", "messages": [{"role": "user", "content": "hi"}]}).encode()
    port = int(url.rsplit(":", 1)[1])
    conns = [rawhttp.Conn("127.0.0.1", port) for _ in range(concurrency)]
    done = 0
    end = time.monotonic() + seconds

    async def worker(conn: rawhttp.Conn) -> None:
        nonlocal done
        while time.monotonic() < end:
            status, _ = await conn.request("POST", "/v1/chat/completions", body, CLIENT_HEADERS)
            if status != 200:
                raise RuntimeError(f"status {status}")
            done += 1

    started = time.monotonic()
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for conn in conns:
            conn.close()
    return done / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=60, help="5-turn chains per store")
    parser.add_argument("--seconds", type=float, default=10, help="each throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per setup")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print(
        "load average at start: {:.1f} {:.1f} {:.1f} on {} cores".format(
            *os.getloadavg(), os.cpu_count()
        )
    )
    poe = PoeServer()
    try:
        with RedisServer() as store:
            latency = chain_latency(poe, store.url, args.chains)
            print("Responses chain, turns 2-5 (read the previous response, store this one):")
            for name, times in latency.items():
                print(
                    f"  {name:10} median {statistics.median(times):6.2f} ms  "
                    f"p99 {pct(times, 99):6.2f} ms  ({len(times)} turns)"
                )
            rates: dict[int, list[float]] = {1: [], 2: []}
            with (
                plain_server(poe, store.url, workers=1) as one,
                plain_server(poe, store.url, workers=2) as two,
            ):
                for url in (one, two):
                    asyncio.run(throughput(url, 2, args.concurrency))  # warm up
                for _ in range(args.rounds):
                    for workers, url in ((1, one), (2, two)):
                        rate = asyncio.run(throughput(url, args.seconds, args.concurrency))
                        rates[workers].append(rate)
            print(f"Chat completions/s, {args.concurrency} clients, state in Redis:")
            for workers, runs in rates.items():
                shown = ", ".join(f"{r:.0f}" for r in runs)
                print(f"  --workers {workers}: median {statistics.median(runs):6.0f}/s  ({shown})")
            print(f"  ratio: {statistics.median(rates[2]) / statistics.median(rates[1]):.2f}x")
    finally:
        poe.stop()


if __name__ == "__main__":
    main()
