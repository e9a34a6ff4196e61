"""fastapi-poe's client alone: CPU per request of a process that only queries the stand-in.

    .venv/bin/python bench/poe_client_loop.py BASE_URL KEY [--bot Hi] [--requests 1000]
                                              [--concurrency 16]

Runs ``fastapi_poe.client.stream_request_base`` loops over one shared httpx pool (as the addon
does: no retries, no environment proxy settings) and prints one JSON line with this process's
CPU milliseconds per request (user + system, after a warm-up), the wall time and errors. The
addon pays at least this much per request for talking to Poe.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import httpx
from fastapi_poe.client import stream_request_base
from fastapi_poe.types import ProtocolMessage, QueryRequest


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


async def run(base_url: str, key: str, bot: str, requests: int, concurrency: int) -> dict:
    session = httpx.AsyncClient(
        trust_env=False,
        timeout=60,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    )
    errors = 0
    events = 0

    async def one(i: int) -> None:
        nonlocal errors, events
        query = QueryRequest(
            version="1.0",
            type="query",
            query=[ProtocolMessage(role="user", content=f"hello {i}")],
            user_id="bench",
            conversation_id=f"c{i}",
            message_id=f"m{i}",
        )
        try:
            async for _ in stream_request_base(
                request=query,
                bot_name=bot,
                api_key=key,
                session=session,
                num_tries=1,
                base_url=base_url,
            ):
                events += 1
        except Exception:
            errors += 1

    async def worker(ids: range) -> None:
        for i in ids:
            await one(i)

    async def batch(n: int) -> None:
        per = max(1, n // concurrency)
        await asyncio.gather(*(worker(range(w * per, (w + 1) * per)) for w in range(concurrency)))

    await batch(min(100, requests))  # warm-up: connections, pydantic, imports
    errors = events = 0
    done = (requests // concurrency) * concurrency
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    await batch(requests)
    cpu1, wall1 = cpu_seconds(), time.perf_counter()
    await session.aclose()
    return {
        "requests": done,
        "concurrency": concurrency,
        "errors": errors,
        "events": events,
        "wall_s": round(wall1 - wall0, 3),
        "cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / done, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base_url")
    parser.add_argument("key")
    parser.add_argument("--bot", default="Hi")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    a = parser.parse_args()
    print(json.dumps(asyncio.run(run(a.base_url, a.key, a.bot, a.requests, a.concurrency))))


if __name__ == "__main__":
    main()
