"""6. Peers: the addon and the plain server against a minimal FastAPI bridge (bench/bridge.py)
and the canned mitmdump, side by side in one interleaved run: non-streamed req/s and server
CPU per request at concurrency 1/16/64, and time to first token against fastapi-poe direct.

Each round runs every target once, in an order rotated from round to round; the figures are
medians over rounds, and each ratio is taken within a round (then its median), since the
machine's speed drifts between rounds more than between two back-to-back measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from run import (
    BENCH,
    CLIENT_HEADERS,
    KEY,
    POE_HEADERS,
    Mitmdump,
    Plan,
    PoeServer,
    chat_body,
    load,
    log,
    pid_of,
    poe_body,
    r,
    ttft_ms,
)

REPO = BENCH.parent
TARGETS = ("bridge", "plain", "addon", "canned")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(args: list[str], port: int, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A server process, once its port answers."""
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args} did not start")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def peers(plan: Plan, m: Mitmdump, canned: Mitmdump, poe: PoeServer) -> dict[str, Any]:
    bridge_port, plain_port = free_port(), free_port()
    bridge_args = [sys.executable, str(BENCH / "bridge.py"), poe.base_url, KEY, str(bridge_port)]
    plain_args = [sys.executable, "-m", "addon", "serve", "--port", str(plain_port)]
    plain_env = {"POE_API_KEY": KEY, "POE_BASE_URL": poe.base_url}
    with (
        server(bridge_args, bridge_port, {}) as bridge,
        server(plain_args, plain_port, plain_env) as plain,
    ):
        ports = {
            "bridge": (bridge.pid, bridge_port),
            "plain": (plain.pid, plain_port),
            "addon": (pid_of(m), m.reverse_port or 0),
            "canned": (pid_of(canned), canned.reverse_port or 0),
        }
        return {
            "throughput": throughput(plan, ports),
            "first_token": first_tokens(plan, ports, poe),
        }


def throughput(plan: Plan, ports: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    body = chat_body("Hi", False)
    rows = []
    for concurrency, requests in plan.cpu_requests:
        rounds: list[dict[str, dict[str, float]]] = []
        for rnd in range(max(3, plan.cpu_rounds)):
            order = TARGETS[rnd % len(TARGETS) :] + TARGETS[: rnd % len(TARGETS)]
            figures = {}
            for t in order:
                pid, port = ports[t]
                res = asyncio.run(load(pid, port, body, concurrency, requests, b"Hello world"))
                figures[t] = {
                    "rps": res["requests"] / res["wall_s"],
                    "cpu_ms": res["cpu_s"] * 1000 / res["requests"],
                    "errors": res["errors"],
                }
            rounds.append(figures)
        row: dict[str, Any] = {"concurrency": concurrency, "rounds": rounds}
        for t in TARGETS:
            row[f"{t}_rps"] = r(statistics.median(f[t]["rps"] for f in rounds), 1)
            row[f"{t}_cpu_ms"] = r(statistics.median(f[t]["cpu_ms"] for f in rounds), 3)
            row[f"{t}_errors"] = sum(int(f[t]["errors"]) for f in rounds)
        for a, b, what in (
            ("addon", "bridge", "rps"),
            ("addon", "canned", "rps"),
            ("plain", "bridge", "rps"),
            ("plain", "bridge", "cpu_ms"),
        ):
            row[f"{a}_{b}_{what}_ratio"] = r(
                statistics.median(f[a][what] / f[b][what] for f in rounds), 3
            )
        rows.append(row)
        log(
            f"peers c={concurrency}: "
            + ", ".join(f"{t} {row[f'{t}_rps']}/s {row[f'{t}_cpu_ms']} ms" for t in TARGETS)
        )
    return rows


def first_tokens(plan: Plan, ports: dict[str, tuple[int, int]], poe: PoeServer) -> dict[str, Any]:
    """Streamed 'Hi' through each front end and fastapi-poe's server direct, in blocks of 10
    (switching target on every request adds a few ms to all), blocks interleaved."""
    body = chat_body("Hi", True)
    urls = {t: f"http://127.0.0.1:{ports[t][1]}/v1/chat/completions" for t in TARGETS[:3]}
    times: dict[str, list[float]] = {t: [] for t in (*urls, "direct")}
    with httpx.Client(trust_env=False, timeout=30) as client:

        def one(t: str) -> float:
            if t == "direct":
                return ttft_ms(client, f"{poe.base_url}Hi", poe_body(), POE_HEADERS, False)
            return ttft_ms(client, urls[t], body, CLIENT_HEADERS, True)

        for t in times:  # warm-up
            for _ in range(10):
                one(t)
        blocks = max(2, plan.ttft_requests // 40)
        names = list(times)
        for b in range(blocks):
            for t in names[b % len(names) :] + names[: b % len(names)]:
                times[t] += [one(t) for _ in range(10)]
    out: dict[str, Any] = {"requests_each": len(times["direct"])}
    for t, values in times.items():
        out[f"{t}_median_ms"] = r(statistics.median(values))
    for t in urls:
        out[f"{t}_added_ms"] = r(out[f"{t}_median_ms"] - out["direct_median_ms"])
    return out


def table_rows(res: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(figure, value, target, verdict) for the Performance table."""
    rows: list[tuple[str, str, str, bool | None]] = []
    for row in res["throughput"]:
        c = row["concurrency"]
        rows.append(
            (
                f"   non-streamed c={c}: req/s (CPU ms) bridge | plain | addon | canned",
                " | ".join(f"{row[f'{t}_rps']:.0f} ({row[f'{t}_cpu_ms']:.2f})" for t in TARGETS),
                "0 errors",
                sum(row[f"{t}_errors"] for t in TARGETS) == 0,
            )
        )
        ab, ac = row["addon_bridge_rps_ratio"], row["addon_canned_rps_ratio"]
        rows.append((f"   c={c} addon / bridge req/s", f"{ab:.2f}x", ">= 1.0x", ab >= 1.0))
        rows.append((f"   c={c} addon / canned req/s", f"{ac:.2f}x", ">= 0.60x", ac >= 0.6))
        pb, pc = row["plain_bridge_rps_ratio"], row["plain_bridge_cpu_ms_ratio"]
        rows.append((f"   c={c} plain / bridge req/s", f"{pb:.2f}x", ">= 1.3x", pb >= 1.3))
        rows.append(
            (f"   c={c} plain / bridge CPU per request", f"{pc:.2f}x", "<= 0.75x", pc <= 0.75)
        )
    t = res["first_token"]
    rows.append(
        (
            f"   first token median ({t['requests_each']} each): direct | bridge | plain | addon",
            f"{t['direct_median_ms']} | {t['bridge_median_ms']} | {t['plain_median_ms']} | "
            f"{t['addon_median_ms']} ms",
            "",
            None,
        )
    )
    rows.append(
        (
            "   addon first token - direct",
            f"{t['addon_added_ms']} ms",
            "<= 3 ms",
            t["addon_added_ms"] <= 3,
        )
    )
    rows.append(
        (
            "   plain first token - direct",
            f"{t['plain_added_ms']} ms",
            "<= 1 ms",
            t["plain_added_ms"] <= 1,
        )
    )
    return rows


if __name__ == "__main__":
    sys.exit(f"run it through {Path(__file__).parent / 'run.py'}")
