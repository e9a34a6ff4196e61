"""The stand-in Poe server (tests/fake_poe.py) in a process of its own, for the benchmarks.

    .venv/bin/python bench/poe_server.py [--key KEY]

Prints ``PORT <n>`` once it listens and serves until its stdin closes (the parent exits) or
it gets SIGTERM/SIGINT. A separate process keeps the server's work off the load generator's
GIL, which would otherwise distort every figure.

Bots are scripted by name, so the benchmark needs no control channel:

* ``Hi``: two text events, "Hello" and " world" (time to first token, CPU per request).
* ``Stamp-<n>-<ms>``: n text events ``<ms>`` apart, each text the server's ``time.time()`` at
  send time followed by ``|`` (per-token forwarding delay; both processes share the clock).
* ``Ones-<n>``: n one-token text events (``"tok "``) as fast as the server can write them.
* ``Slow-<n>-<ms>``: n text events spread evenly over ``<ms>`` (overlapping streams).

Any other bot is a 404 (the stand-in's answer for an unknown bot). ``GET /bench/stats`` gives
the number of queries and of distinct client connections (address, port) they came over.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_poe import Event, FakePoe, Recorded, Step, encode_event, sleep, text
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

KEY = "poe-bench-key"
STAMP = "bench-stamp"  # marker events, expanded by BenchPoe._play
ONES = "bench-ones"
ONE_TOKEN = encode_event("text", {"text": "tok "})
DONE = encode_event("done", {})


@functools.lru_cache(maxsize=256)
def _script(bot: str) -> tuple[Step, ...] | None:
    if bot == "Hi":
        return (text("Hello"), text(" world"))
    if m := re.fullmatch(r"Stamp-(\d+)-(\d+(?:\.\d+)?)", bot):
        return (Event(STAMP, {"n": int(m[1]), "interval": float(m[2]) / 1000}),)
    if m := re.fullmatch(r"Ones-(\d+)", bot):
        return (Event(ONES, {"n": int(m[1])}),)
    if m := re.fullmatch(r"Slow-(\d+)-(\d+)", bot):
        n, total = int(m[1]), int(m[2]) / 1000
        steps: list[Step] = []
        for i in range(n):
            steps += [sleep(total / n), text(f"tok{i} ")]
        return tuple(steps)
    return None


class BenchPoe(FakePoe):
    """FakePoe with bots scripted by name and a bounded request record."""

    def __init__(self, key: str) -> None:
        super().__init__(api_keys=(key,))
        # The stand-in records every request (with its body); keep only the latest few.
        self.requests = collections.deque(maxlen=32)  # type: ignore[assignment]
        # Client ports seen: how many TCP connections the queries came over.
        self.queries = 0
        self.ports: set[tuple[str, int]] = set()
        self.app.router.routes.append(Route("/bench/stats", self._stats, methods=["GET"]))

    async def _stats(self, request: Request) -> Response:
        return JSONResponse({"queries": self.queries, "connections": len(self.ports)})

    async def _bot_endpoint(self, request: Request) -> Response:
        if request.client is not None:
            self.ports.add((request.client.host, request.client.port))
        self.queries += 1
        return await super()._bot_endpoint(request)

    def _next_script(self, bot: str) -> list[Step] | None:
        steps = _script(bot)
        return list(steps) if steps is not None else super()._next_script(bot)

    async def _play(self, rec: Recorded, steps: list[Step]) -> AsyncIterator[bytes]:
        first = steps[0] if len(steps) == 1 else None
        if isinstance(first, Event) and first.event in (STAMP, ONES):
            n = int(first.data["n"])
            if first.event == ONES:
                for _ in range(n):
                    yield ONE_TOKEN
            else:
                interval = float(first.data["interval"])
                start = time.monotonic()
                for i in range(n):
                    # An absolute schedule: a late event does not delay the ones after it.
                    delay = start + i * interval - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    yield encode_event("text", {"text": f"{time.time():.6f}|"})
            rec.events_sent += n
            yield DONE
            rec.finished = time.monotonic()
            return
        async for chunk in super()._play(rec, steps):
            yield chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--key", default=KEY, help="the Poe key the server accepts")
    args = parser.parse_args()
    server = BenchPoe(args.key)
    server.start()
    print(f"PORT {server.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def watch_stdin() -> None:
        sys.stdin.read()  # returns when the parent closes the pipe (or dies)
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.wait(0.5):
        pass
    server.stop()


if __name__ == "__main__":
    main()
