"""The addon as it is in the work tree against a committed version, side by side in one run.

    .venv/bin/python bench/compare.py              # against HEAD (what the uncommitted change does)
    .venv/bin/python bench/compare.py --base HEAD~3 --rounds 6

Before a change to the hot path lands, this says whether it helped: both versions run at once
(two mitmdump processes, one stand-in Poe server), every measurement interleaved A B, then B A,
so the machine's drift hits both alike. It prints, for each: time to first token (median, p99),
per-token delay (median), and mitmdump CPU milliseconds per request (JSON and streamed, at
concurrency 16), with the difference work tree - base. bench/run.py is the full benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import httpx
from run import (
    BENCH,
    CLIENT_HEADERS,
    Mitmdump,
    PoeServer,
    addon_mitmdump,
    chat_body,
    load,
    log,
    new_stamps,
    pct,
    pid_of,
    r,
    raise_client_open_files,
    running,
    stamp_run,
    ttft_ms,
)

REPO = BENCH.parent
Figures = dict[str, dict[str, float]]
Ratios = dict[str, tuple[float, float, float]]


def export(rev: str, into: Path) -> Path:
    """The addon package as committed at ``rev``; the script puts its own parent first on
    sys.path, so that copy is the one mitmdump imports."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "addon", "mappings"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "addon" / "poe_openai.py"


def compare(rounds: int, ttft_requests: int, base_rev: str) -> tuple[Figures, Ratios]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    poe = PoeServer()
    try:
        scripts = {"base": export(base_rev, tmp), "work": REPO / "addon" / "poe_openai.py"}
        with (
            running(addon_mitmdump(poe, scripts["base"])) as base,
            running(addon_mitmdump(poe, scripts["work"])) as work,
        ):
            procs = {"base": base, "work": work}
            log(f"base ({base_rev}) pid {pid_of(base)}, work tree pid {pid_of(work)}")
            return measure(procs, poe, rounds, ttft_requests)
    finally:
        poe.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def measure(
    procs: dict[str, Mitmdump], poe: PoeServer, rounds: int, ttft_requests: int
) -> tuple[Figures, Ratios]:
    names = list(procs)
    ttft: dict[str, list[float]] = {n: [] for n in names}
    stamps = {n: new_stamps() for n in names}
    cpu: dict[str, dict[str, list[float]]] = {n: {"json": [], "sse": []} for n in names}
    stream_body = chat_body("Hi", True)
    stamp_body = chat_body("Stamp-200-5", True)
    with httpx.Client(trust_env=False, timeout=60) as client:

        def url(n: str) -> str:
            return f"{procs[n].reverse_url}/chat/completions"

        for n in names:  # warm-up: connections, imports, caches
            for _ in range(20):
                ttft_ms(client, url(n), stream_body, CLIENT_HEADERS, True)
        for rnd in range(rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            log(f"round {rnd + 1}/{rounds}")
            # in blocks of 10: switching process on every request adds a few ms to both
            for i in range(0, ttft_requests, 10):
                for n in order if i % 20 == 0 else order[::-1]:
                    for _ in range(min(10, ttft_requests - i)):
                        ttft[n].append(ttft_ms(client, url(n), stream_body, CLIENT_HEADERS, True))
            for n in order:
                stamp_run(client, url(n), stamp_body, CLIENT_HEADERS, True, stamps[n])
            for kind, stream, expect in (("json", False, b"Hello world"), ("sse", True, b"[DONE]")):
                for n in order:
                    p = procs[n]
                    res = asyncio.run(
                        load(
                            pid_of(p), p.reverse_port or 0, chat_body("Hi", stream), 16, 320, expect
                        )
                    )
                    if res["errors"]:
                        raise RuntimeError(f"{n}: {res['errors']} errors under load")
                    cpu[n][kind].append(res["cpu_s"] * 1000 / res["requests"])
    out: dict[str, dict[str, float]] = {}
    for n in names:
        out[n] = {
            "first token median ms": statistics.median(ttft[n]),
            "first token p99 ms": pct(ttft[n], 99),
            "per-token delay median ms": statistics.median(stamps[n]["delays"]),
            "CPU ms/request JSON c=16 (median of rounds)": statistics.median(cpu[n]["json"]),
            "CPU ms/request SSE c=16 (median of rounds)": statistics.median(cpu[n]["sse"]),
        }
    # The machine's speed drifts between rounds: the ratio within each round (both measured
    # back to back) is steadier than either median.
    ratios = {}
    for kind in ("json", "sse"):
        per_round = [w / b for w, b in zip(cpu["work"][kind], cpu["base"][kind], strict=True)]
        ratios[kind] = (statistics.median(per_round), min(per_round), max(per_round))
    return out, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="HEAD", help="the committed version to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--ttft-requests", type=int, default=100, help="per round and version")
    args = parser.parse_args()
    raise_client_open_files()
    res, ratios = compare(args.rounds, args.ttft_requests, args.base)
    print(f"{'figure':46} {'base':>9} {'work':>9} {'work-base':>10}")
    for figure in res["base"]:
        b, w = res["base"][figure], res["work"][figure]
        print(f"{figure:46} {r(b, 3):>9} {r(w, 3):>9} {r(w - b, 3):>+10}")
    for kind, (median, low, high) in ratios.items():
        print(
            f"CPU work/base {kind}, per round: median {median:.3f} (min {low:.3f}, max {high:.3f})"
        )


if __name__ == "__main__":
    main()
