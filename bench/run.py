"""Performance figures for the poe-openai addon, against the stand-in Poe server.

    .venv/bin/python bench/run.py            # full run, about 4 minutes on 2 idle cores
    .venv/bin/python bench/run.py --quick    # smoke run, about 40 s (figures are rough)
    .venv/bin/python bench/run.py --profile  # a streaming load under py-spy (see README.md)

Starts the stand-in Poe server (bench/poe_server.py, its own process) and real mitmdump
processes (tests/harness.py), measures, prints a table and writes it to bench/results.json.
bench/README.md says what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

import httpx  # noqa: E402
import rawhttp  # noqa: E402
from harness import Mitmdump  # noqa: E402
from poe_server import KEY  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
CLIENT_HEADERS = {"authorization": "Bearer bench-client", "content-type": "application/json"}
POE_HEADERS = {
    "authorization": f"Bearer {KEY}",
    "content-type": "application/json",
    "accept": "text/event-stream",
}
STORE_LIMIT = 1_000_000  # poe_stream_store_limit's default


@dataclass(frozen=True)
class Plan:
    ttft_requests: int = 400
    token_runs: int = 5
    token_events: int = 200
    token_interval_ms: int = 5
    cpu_rounds: int = 3
    cpu_requests: tuple[tuple[int, int], ...] = ((1, 150), (16, 320), (64, 384))
    poe_alone_requests: int = 2000
    scale_streams: int = 1000
    scale_spread_s: float = 2.0
    scale_bot: str = "Slow-10-5000"
    long_events: tuple[int, int] = (10_000, 100_000)
    long_runs: tuple[int, int] = (3, 1)
    prompt_events: int = 2000
    prompt_runs: int = 5
    prompt_kb: int = 100


FULL = Plan()
QUICK = Plan(
    ttft_requests=60,
    token_runs=1,
    token_events=100,
    cpu_rounds=1,
    cpu_requests=((1, 20), (16, 64), (64, 128)),
    poe_alone_requests=192,
    scale_streams=100,
    scale_spread_s=0.3,
    scale_bot="Slow-10-1000",
    long_events=(500, 5_000),
    long_runs=(1, 1),
    prompt_events=300,
    prompt_runs=2,
)


# --- measuring processes -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class PeakRss:
    """Polls a process's VmRSS in a thread; ``peak_kb`` is the largest value seen."""

    def __init__(self, pid: int, every: float = 0.01) -> None:
        self.pid, self.every = pid, every
        self.peak_kb = rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            self.peak_kb = max(self.peak_kb, rss_kb(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, rss_kb(self.pid))


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def r(x: float, digits: int = 2) -> float:
    return round(x, digits)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the processes under test --------------------------------------------------------------


class PoeServer:
    """bench/poe_server.py in its own process (its GIL is not the load generator's)."""

    def __init__(self) -> None:
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives as long as the server)
            prefix="bench-poe-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "poe_server.py"), "--key", KEY],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            output = Path(self.log.name).read_text()
            self.stop()
            raise RuntimeError(f"stand-in Poe server did not start: {output}")
        self.port = int(line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}/bot/"

    def stats(self) -> dict[str, int]:
        """Queries served so far, and the distinct TCP connections they came over."""
        with httpx.Client(trust_env=False, timeout=10) as client:
            return client.get(f"http://127.0.0.1:{self.port}/bench/stats").json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the server exits when its stdin closes
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


class ScriptMitmdump(Mitmdump):
    """The same mitmdump, loading ``script`` instead of the work tree's addon."""

    def __init__(self, script: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script = script

    def command(self) -> list[str]:
        args = super().command()
        args[args.index("-s") + 1] = str(self.script)
        return args


def addon_mitmdump(poe: PoeServer, script: Path | None = None) -> Mitmdump:
    """The addon (or another checkout's copy of it, ``script``) answering from the stand-in."""
    options = {"poe_base_url": poe.base_url, "flow_detail": "0"}
    env = {"POE_API_KEY": KEY}
    if script is None:
        return Mitmdump(options=options, env=env, regular=False).start()
    return ScriptMitmdump(script, options=options, env=env, regular=False).start()


def canned_mitmdump(canned_file: Path) -> Mitmdump:
    """The floor: bench/canned_addon.py answering every request itself."""
    options = {"connection_strategy": "lazy", "flow_detail": "0"}
    return ScriptMitmdump(
        BENCH / "canned_addon.py",
        options=options,
        env={"BENCH_CANNED": str(canned_file)},
        regular=False,
    ).start()


def pid_of(m: Mitmdump) -> int:
    assert m.proc is not None
    return m.proc.pid


@contextlib.contextmanager
def running(m: Mitmdump) -> Iterator[Mitmdump]:
    try:
        yield m
    finally:
        m.stop()
        shutil.rmtree(m.confdir, ignore_errors=True)


# --- request bodies ------------------------------------------------------------------------


def chat_body(model: str, stream: bool, messages: list[dict[str, str]] | None = None) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages or [{"role": "user", "content": "hello"}],
    }
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def poe_body(content: str = "hello") -> bytes:
    return json.dumps(
        {
            "version": "1.0",
            "type": "query",
            "query": [{"role": "user", "content": content}],
            "user_id": "bench",
            "conversation_id": "bench-c",
            "message_id": "bench-m",
        }
    ).encode()


def history(kb: int) -> list[dict[str, str]]:
    """A conversation of about ``kb`` KB: 2 KB turns, user and assistant in turn."""
    turn = ("lorem ipsum dolor sit amet " * 80)[:2000]
    n = max(1, kb * 1024 // 2000)
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} {turn}"} for i in range(n)
    ]
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "go on"})
    return messages


# --- 1. time to first token ----------------------------------------------------------------


def ttft_ms(
    client: httpx.Client, url: str, body: bytes, headers: dict[str, str], addon: bool
) -> float:
    """One streamed request: milliseconds to the first line carrying answer text."""
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", url, content=body, headers=headers) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status_code}")
        for line in resp.iter_lines():
            if first is not None:
                continue  # drain, so the connection is reused
            if addon:
                hit = line.startswith("data: {") and '"content":"' in line
                hit = hit and '"content":""' not in line  # not the role chunk
            else:
                hit = line == "event: text"
            if hit:
                first = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{url}: no text")
    return (first - t0) * 1000


def first_token(plan: Plan, m: Mitmdump, poe: PoeServer) -> dict[str, Any]:
    addon_url = f"{m.reverse_url}/chat/completions"
    direct_url = f"{poe.base_url}Hi"
    addon_body, direct_body = chat_body("Hi", True), poe_body()
    timed = ttft_ms

    addon_ms: list[float] = []
    direct_ms: list[float] = []
    with httpx.Client(trust_env=False, timeout=30) as client:

        def a() -> float:
            return timed(client, addon_url, addon_body, CLIENT_HEADERS, True)

        def b() -> float:
            return timed(client, direct_url, direct_body, POE_HEADERS, False)

        for _ in range(20):  # warm-up: connections, imports, caches
            a(), b()
        for i in range(plan.ttft_requests):
            if i % 2 == 0:  # A B, then B A: drift and order effects hit both alike
                addon_ms.append(a())
                direct_ms.append(b())
            else:
                direct_ms.append(b())
                addon_ms.append(a())
    out = {
        "requests_each": plan.ttft_requests,
        "addon_median_ms": r(statistics.median(addon_ms)),
        "addon_p99_ms": r(pct(addon_ms, 99)),
        "direct_median_ms": r(statistics.median(direct_ms)),
        "direct_p99_ms": r(pct(direct_ms, 99)),
    }
    out["added_median_ms"] = r(out["addon_median_ms"] - out["direct_median_ms"])
    out["added_p99_ms"] = r(out["addon_p99_ms"] - out["direct_p99_ms"])
    return out


# --- 2. per-token forwarding ---------------------------------------------------------------


def new_stamps() -> dict[str, Any]:
    return {"chunks": 0, "most_stamps_per_chunk": 0, "delays": []}


def stamp_run(
    client: httpx.Client,
    url: str,
    body: bytes,
    headers: dict[str, str],
    via_addon: bool,
    acc: dict[str, Any],
) -> None:
    """One stamped stream: per chunk, the delay since the stand-in wrote each stamp in it."""
    with client.stream("POST", url, content=body, headers=headers) as resp:
        for line in resp.iter_lines():
            now = time.time()  # arrival, before any parsing
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if via_addon:
                choices = data.get("choices") or [{}]
                content = choices[0].get("delta", {}).get("content")
            else:
                content = data.get("text")
            if not content:
                continue
            stamps = content.split("|")[:-1]
            acc["chunks"] += 1
            acc["most_stamps_per_chunk"] = max(acc["most_stamps_per_chunk"], len(stamps))
            acc["delays"] += [(now - float(s)) * 1000 for s in stamps]


def per_token(plan: Plan, m: Mitmdump, poe: PoeServer) -> dict[str, Any]:
    bot = f"Stamp-{plan.token_events}-{plan.token_interval_ms}"
    addon, direct = new_stamps(), new_stamps()

    def run(client: httpx.Client, via_addon: bool) -> None:
        if via_addon:
            url, body, headers = (
                f"{m.reverse_url}/chat/completions",
                chat_body(bot, True),
                CLIENT_HEADERS,
            )
            stamp_run(client, url, body, headers, True, addon)
        else:
            stamp_run(client, f"{poe.base_url}{bot}", poe_body(), POE_HEADERS, False, direct)

    with httpx.Client(trust_env=False, timeout=60) as client:
        run(client, True), run(client, False)  # warm-up
        for acc in (addon, direct):
            acc.update(chunks=0, most_stamps_per_chunk=0, delays=[])
        for i in range(plan.token_runs):
            order = (True, False) if i % 2 == 0 else (False, True)
            for via_addon in order:
                run(client, via_addon)
    events = plan.token_events * plan.token_runs
    out: dict[str, Any] = {"events_in": events}
    for name, acc in (("addon", addon), ("direct", direct)):
        d = acc["delays"]
        out[f"{name}_chunks_out"] = acc["chunks"]
        out[f"{name}_most_stamps_per_chunk"] = acc["most_stamps_per_chunk"]
        out[f"{name}_stamps_seen"] = len(d)
        out[f"{name}_median_ms"] = r(statistics.median(d), 3)
        out[f"{name}_p99_ms"] = r(pct(d, 99), 3)
    out["added_median_ms"] = r(out["addon_median_ms"] - out["direct_median_ms"], 3)
    out["added_p99_ms"] = r(out["addon_p99_ms"] - out["direct_p99_ms"], 3)
    out["no_coalescing"] = (
        out["addon_chunks_out"] == events and out["addon_most_stamps_per_chunk"] == 1
    )
    return out


# --- 3. CPU per request --------------------------------------------------------------------


def capture_canned(m: Mitmdump, path: Path) -> None:
    """The addon's own answers to the two requests, for the canned floor to replay."""
    hop = {"content-length", "transfer-encoding", "connection", "keep-alive", "date"}
    canned = {}
    with httpx.Client(trust_env=False, timeout=30) as client:
        for kind, stream in (("json", False), ("sse", True)):
            resp = client.post(
                f"{m.reverse_url}/chat/completions",
                content=chat_body("Hi", stream),
                headers=CLIENT_HEADERS,
            )
            resp.raise_for_status()
            canned[kind] = {
                "status": resp.status_code,
                "headers": {k: v for k, v in resp.headers.items() if k.lower() not in hop},
                "body": resp.text,
            }
    path.write_text(json.dumps(canned))


async def load(
    pid: int,
    port: int,
    body: bytes,
    concurrency: int,
    requests: int,
    expect: bytes,
) -> dict[str, Any]:
    """``requests`` POSTs over ``concurrency`` keep-alive connections; the CPU the process
    ``pid`` spent meanwhile. Connections are opened (and used once) before measuring."""
    path = "/v1/chat/completions"
    conns = [rawhttp.Conn("127.0.0.1", port) for _ in range(concurrency)]
    await asyncio.gather(*(c.request("POST", path, body, CLIENT_HEADERS) for c in conns))
    per = requests // concurrency
    errors = 0

    async def worker(conn: rawhttp.Conn) -> None:
        nonlocal errors
        for _ in range(per):
            try:
                status, data = await conn.request("POST", path, body, CLIENT_HEADERS)
                ok = status == 200 and expect in data
            except (OSError, asyncio.IncompleteReadError, rawhttp.HTTPError):
                conn.close()
                ok = False
            errors += not ok

    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    wall, cpu1 = time.perf_counter() - t0, cpu_seconds(pid)
    for c in conns:
        c.close()
    done = per * concurrency
    return {"requests": done, "errors": errors, "wall_s": wall, "cpu_s": cpu1 - cpu0}


def cpu_per_request(plan: Plan, m: Mitmdump, canned: Mitmdump, poe: PoeServer) -> dict[str, Any]:
    targets = {"addon": m, "floor": canned}
    rows = []
    for kind, stream, expect in (("json", False, b"Hello world"), ("sse", True, b"[DONE]")):
        body = chat_body("Hi", stream)
        for concurrency, requests in plan.cpu_requests:
            sums = {t: {"requests": 0, "errors": 0, "wall_s": 0.0, "cpu_s": 0.0} for t in targets}
            queries = connections = 0
            for rnd in range(plan.cpu_rounds):
                order = list(targets) if rnd % 2 == 0 else list(targets)[::-1]
                for t in order:
                    proc = targets[t]
                    before = poe.stats()
                    res = asyncio.run(
                        load(
                            pid_of(proc),
                            proc.reverse_port or 0,
                            body,
                            concurrency,
                            requests,
                            expect,
                        )
                    )
                    if t == "addon":
                        after = poe.stats()
                        queries += after["queries"] - before["queries"]
                        connections += after["connections"] - before["connections"]
                    for k in sums[t]:
                        sums[t][k] += res[k]
            row: dict[str, Any] = {"kind": kind, "concurrency": concurrency}
            for t, s in sums.items():
                row[f"{t}_rps"] = r(s["requests"] / s["wall_s"], 1)
                row[f"{t}_cpu_ms"] = r(s["cpu_s"] * 1000 / s["requests"], 3)
                row[f"{t}_errors"] = s["errors"]
            row["added_cpu_ms"] = r(row["addon_cpu_ms"] - row["floor_cpu_ms"], 3)
            row["poe_connections_per_query"] = r(connections / max(1, queries), 2)
            rows.append(row)
            log(
                f"cpu {kind} c={concurrency}: addon {row['addon_cpu_ms']} ms/req "
                f"({row['addon_rps']}/s), floor {row['floor_cpu_ms']} ms/req ({row['floor_rps']}/s)"
            )
    before = poe.stats()
    alone = subprocess.run(
        [
            sys.executable,
            str(BENCH / "poe_client_loop.py"),
            poe.base_url,
            KEY,
            "--requests",
            str(plan.poe_alone_requests),
            "--concurrency",
            "16",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    after = poe.stats()
    figures = json.loads(alone.stdout.strip().splitlines()[-1])
    figures["poe_connections_per_query"] = r(
        (after["connections"] - before["connections"])
        / max(1, after["queries"] - before["queries"]),
        2,
    )
    return {"rows": rows, "fastapi_poe_alone": figures}


# --- 4. scale ------------------------------------------------------------------------------


def raise_client_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def scale(plan: Plan, poe: PoeServer) -> dict[str, Any]:
    n, spread = plan.scale_streams, plan.scale_spread_s
    events = int(plan.scale_bot.split("-")[1])
    body = chat_body(plan.scale_bot, True)
    with running(addon_mitmdump(poe)) as m:
        pid, port = pid_of(m), m.reverse_port or 0

        asyncio.run(load(pid, port, chat_body("Hi", True), 8, 64, b"[DONE]"))  # warm-up
        time.sleep(1.0)
        idle = rss_kb(pid)
        state = {"open": 0, "peak_open": 0}
        failures: dict[str, int] = {}

        async def one(i: int) -> None:
            await asyncio.sleep(i * spread / n)
            conn = rawhttp.Conn("127.0.0.1", port)
            opened = False
            try:
                await conn.connect()
                opened = True
                state["open"] += 1
                state["peak_open"] = max(state["peak_open"], state["open"])
                status, data = await conn.request(
                    "POST", "/v1/chat/completions", body, CLIENT_HEADERS
                )
                if status != 200:
                    failures[f"HTTP {status}"] = failures.get(f"HTTP {status}", 0) + 1
                elif data.count(b'"content":"tok') != events or b"[DONE]" not in data:
                    failures["incomplete"] = failures.get("incomplete", 0) + 1
            except Exception as e:
                failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1
            finally:
                state["open"] -= opened
                conn.close()

        async def main() -> float:
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            return time.perf_counter() - t0

        with PeakRss(pid) as peak:
            wall = asyncio.run(main())
        time.sleep(2.0)
        after = rss_kb(pid)
    per_stream_kb = (peak.peak_kb - idle) / n
    return {
        "streams": n,
        "connects_spread_s": spread,
        "bot": plan.scale_bot,
        "events_per_stream": events,
        "wall_s": r(wall),
        "errors": sum(failures.values()),
        "failures": failures,
        "peak_open_client_side": state["peak_open"],
        "idle_rss_mb": r(idle / 1024, 1),
        "peak_rss_mb": r(peak.peak_kb / 1024, 1),
        "rss_after_mb": r(after / 1024, 1),
        "kb_per_open_stream": r(per_stream_kb, 1),
    }


# --- 5. long answers, long prompts ---------------------------------------------------------


async def timed_stream(
    port: int, path: str, body: bytes, headers: dict[str, str], marker: bytes
) -> dict[str, Any]:
    """One streamed request: total seconds, seconds from the first marker to the end, and
    how many markers arrived."""
    pieces: list[bytes] = []
    first: list[float] = []

    def on_data(data: bytes) -> None:
        if not first and marker in data:
            first.append(time.perf_counter())
        pieces.append(data)

    conn = rawhttp.Conn("127.0.0.1", port)
    t0 = time.perf_counter()
    status, _ = await conn.request("POST", path, body, headers, on_data)
    end = time.perf_counter()
    conn.close()
    whole = b"".join(pieces)
    return {
        "status": status,
        "seconds": end - t0,
        "first_s": (first[0] - t0) if first else float("nan"),
        "after_first_s": (end - first[0]) if first else float("nan"),
        "markers": whole.count(marker),
        "bytes": len(whole),
    }


def long_answers(plan: Plan, poe: PoeServer) -> dict[str, Any]:
    with running(addon_mitmdump(poe)) as m:
        pid, port = pid_of(m), m.reverse_port or 0
        asyncio.run(load(pid, port, chat_body("Hi", True), 4, 32, b"[DONE]"))

        def via_addon(bot: str, messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
            body = chat_body(bot, True, messages)
            path = "/v1/chat/completions"
            return asyncio.run(timed_stream(port, path, body, CLIENT_HEADERS, b'"content":"tok '))

        def direct(bot: str) -> dict[str, Any]:
            path = f"/bot/{bot}"
            return asyncio.run(
                timed_stream(poe.port, path, poe_body(), POE_HEADERS, b"event: text")
            )

        via_addon("Ones-1000"), direct("Ones-1000")  # warm-up
        sizes = {}
        for n, runs in zip(plan.long_events, plan.long_runs, strict=True):
            bot = f"Ones-{n}"
            addon_s, direct_s, growth, ok = [], [], [], True
            sse_bytes = 0
            for i in range(runs):
                for which in ("addon", "direct") if i % 2 == 0 else ("direct", "addon"):
                    if which == "direct":
                        res = direct(bot)
                        direct_s.append(res["seconds"])
                        ok = ok and res["markers"] == n
                        continue
                    time.sleep(0.3)
                    base = rss_kb(pid)
                    with PeakRss(pid) as peak:
                        res = via_addon(bot)
                    addon_s.append(res["seconds"])
                    growth.append((peak.peak_kb - base) / 1024)
                    sse_bytes = res["bytes"]
                    ok = ok and res["markers"] == n and res["status"] == 200
            sizes[n] = {
                "events": n,
                "runs": runs,
                "all_events_arrived": ok,
                "addon_s": r(statistics.median(addon_s), 3),
                "direct_s": r(statistics.median(direct_s), 3),
                "addon_us_per_event": r(statistics.median(addon_s) / n * 1e6, 1),
                "direct_us_per_event": r(statistics.median(direct_s) / n * 1e6, 1),
                "rss_growth_mb": r(max(growth), 1),
                "answer_text_mb": r(n * 4 / 2**20, 2),
                "sse_body_mb": r(sse_bytes / 2**20, 1),
            }
            log(f"long {n}: addon {sizes[n]['addon_s']} s, direct {sizes[n]['direct_s']} s")
        small, big = plan.long_events
        out: dict[str, Any] = {"sizes": list(sizes.values())}
        out["events_ratio"] = big / small
        out["addon_time_ratio"] = r(sizes[big]["addon_s"] / sizes[small]["addon_s"], 2)
        out["direct_time_ratio"] = r(sizes[big]["direct_s"] / sizes[small]["direct_s"], 2)

        # a long prompt must not make each event dearer
        n = plan.prompt_events
        long_prompt = history(plan.prompt_kb)
        prompt_bytes = len(json.dumps(long_prompt))
        small_cost, long_cost, small_first, long_first = [], [], [], []
        via_addon(f"Ones-{n}", long_prompt)  # warm-up
        for i in range(plan.prompt_runs):
            for which in ("small", "long") if i % 2 == 0 else ("long", "small"):
                res = via_addon(f"Ones-{n}", long_prompt if which == "long" else None)
                ok = ok and res["markers"] == n
                cost = res["after_first_s"] / (n - 1) * 1e6
                (long_cost if which == "long" else small_cost).append(cost)
                (long_first if which == "long" else small_first).append(res["first_s"] * 1000)
        out["prompt"] = {
            "events": n,
            "runs": plan.prompt_runs,
            "prompt_kb": r(prompt_bytes / 1024, 1),
            "all_events_arrived": ok,
            "tiny_prompt_us_per_event": r(statistics.median(small_cost), 1),
            "long_prompt_us_per_event": r(statistics.median(long_cost), 1),
            "ratio": r(statistics.median(long_cost) / statistics.median(small_cost), 2),
            "tiny_prompt_first_ms": r(statistics.median(small_first), 1),
            "long_prompt_first_ms": r(statistics.median(long_first), 1),
        }
    return out


# --- the table -----------------------------------------------------------------------------


def table(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, verdict) rows; section headers have empty other columns."""
    rows: list[tuple[str, str, str, str]] = []

    def add(name: str, value: str = "", target: str = "", ok: bool | None = None) -> None:
        rows.append((name, value, target, "" if ok is None else "PASS" if ok else "FAIL"))

    if "first_token" not in res:  # --peers-only
        return rows + peer_rows(res)
    t = res["first_token"]
    add(f"1. Time to first token ({t['requests_each']} sequential requests each, interleaved)")
    add("   through the addon, median / p99", f"{t['addon_median_ms']} / {t['addon_p99_ms']} ms")
    add("   stand-in direct, median / p99", f"{t['direct_median_ms']} / {t['direct_p99_ms']} ms")
    add("   added median", f"{t['added_median_ms']} ms", "<= 6 ms", t["added_median_ms"] <= 6)
    add("   added p99", f"{t['added_p99_ms']} ms", "<= 20 ms", t["added_p99_ms"] <= 20)

    p = res["per_token"]
    add(f"2. Per-token forwarding ({p['events_in']} stamped events, 5 ms apart)")
    add(
        "   chunks out / events in (most stamps in one chunk)",
        f"{p['addon_chunks_out']} / {p['events_in']} ({p['addon_most_stamps_per_chunk']})",
        "equal (1)",
        p["no_coalescing"],
    )
    add("   delay via addon, median / p99", f"{p['addon_median_ms']} / {p['addon_p99_ms']} ms")
    add("   delay direct, median / p99", f"{p['direct_median_ms']} / {p['direct_p99_ms']} ms")
    add("   added median", f"{p['added_median_ms']} ms", "<= 1 ms", p["added_median_ms"] <= 1)
    add("   added p99", f"{p['added_p99_ms']} ms")

    c = res["cpu"]
    add("3. CPU per request in mitmdump: addon ms (req/s) | floor ms (req/s) | addon - floor")
    for row in c["rows"]:
        add(
            f"   {row['kind']:4} c={row['concurrency']}",
            f"{row['addon_cpu_ms']:.2f} ({row['addon_rps']:.0f}/s) | "
            f"{row['floor_cpu_ms']:.2f} ({row['floor_rps']:.0f}/s) | {row['added_cpu_ms']:.2f}",
            "0 errors",
            row["addon_errors"] + row["floor_errors"] == 0,
        )
    a = c["fastapi_poe_alone"]
    add(
        f"   fastapi-poe client alone (c={a['concurrency']}, {a['requests']} requests)",
        f"{a['cpu_ms_per_request']:.2f} ms per request",
        "0 errors",
        a["errors"] == 0,
    )
    addon_sum = sum(row["addon_cpu_ms"] for row in c["rows"])
    floor_sum = sum(row["floor_cpu_ms"] for row in c["rows"])
    add(
        "   addon / floor, all rows together (steadier than any one row)",
        f"{addon_sum / floor_sum:.2f}x",
    )
    worst = max(row["added_cpu_ms"] for row in c["rows"])
    add(
        "   addon - floor, highest row, against fastapi-poe alone",
        f"{worst:.2f} vs {a['cpu_ms_per_request']:.2f} ms ({worst / a['cpu_ms_per_request']:.1f}x)",
        "<= alone",
        worst <= a["cpu_ms_per_request"],
    )
    conns = [row["poe_connections_per_query"] for row in c["rows"]]
    add(
        "   new Poe connections per query: addon (fastapi-poe alone)",
        f"{min(conns)}..{max(conns)} ({a['poe_connections_per_query']})",
    )

    s = res["scale"]
    add(
        f"4. Scale: {s['streams']} concurrent streams ({s['bot']}); connects spread over "
        f"{s['connects_spread_s']} s (mitmproxy's listen backlog is 100)"
    )
    add("   wall time", f"{s['wall_s']} s ({s['peak_open_client_side']} open at once)")
    add("   errors", f"{s['errors']} {s['failures'] or ''}".strip(), "0", s["errors"] == 0)
    add(
        "   RSS idle / peak / 2 s after",
        f"{s['idle_rss_mb']} / {s['peak_rss_mb']} / {s['rss_after_mb']} MB",
    )
    kb = s["kb_per_open_stream"]
    add("   memory per open stream", f"{kb} KB", "<= 256 KB", kb <= 256)

    lg = res["long"]
    add("5. Long answers (one-token events) and long prompts")
    for z in lg["sizes"]:
        add(
            f"   {z['events']:>7} events: addon / direct (us per event)",
            f"{z['addon_s']} s / {z['direct_s']} s "
            f"({z['addon_us_per_event']} / {z['direct_us_per_event']})",
            "all arrive",
            z["all_events_arrived"],
        )
    add(
        f"   {lg['events_ratio']:.0f}x the events: addon time ratio (direct)",
        f"{lg['addon_time_ratio']}x ({lg['direct_time_ratio']}x)",
        "<= 12x",
        lg["addon_time_ratio"] <= 12,
    )
    for z in lg["sizes"]:
        bound = rss_bound_mb(z["answer_text_mb"])
        add(
            f"   {z['events']:>7} events: peak RSS growth "
            f"(SSE body {z['sse_body_mb']} MB, text {z['answer_text_mb']} MB)",
            f"{z['rss_growth_mb']} MB",
            f"<= {bound:.1f} MB",
            z["rss_growth_mb"] <= bound,
        )
    pr = lg["prompt"]
    add(
        f"   per-event cost, {pr['prompt_kb']} KB prompt vs tiny ({pr['events']} events)",
        f"{pr['long_prompt_us_per_event']} vs {pr['tiny_prompt_us_per_event']} us ({pr['ratio']}x)",
        "<= 1.2x",
        pr["ratio"] <= 1.2 and pr["all_events_arrived"],
    )
    add(
        "   first token, long vs tiny prompt (per-request cost)",
        f"{pr['long_prompt_first_ms']} vs {pr['tiny_prompt_first_ms']} ms",
    )
    return rows + peer_rows(res)


def peer_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    from peers import table_rows

    rows = [("6. Peers: minimal bridge, plain server, addon, canned mitmdump", "", "", "")]
    for name, value, target, ok in table_rows(res["peers"]):
        rows.append((name, value, target, "" if ok is None else "PASS" if ok else "FAIL"))
    return rows


def rss_bound_mb(answer_text_mb: float) -> float:
    """What a long answer may add to mitmdump's RSS: the stored copy of the streamed body
    (poe_stream_store_limit), a few copies of the answer text, and 16 MB of allocator slack."""
    return STORE_LIMIT / 2**20 + 16 * answer_text_mb + 16


def render(rows: list[tuple[str, str, str, str]]) -> str:
    w0 = max(len(x[0]) for x in rows if x[1])
    w1 = max(len(x[1]) for x in rows)
    w2 = max(len(x[2]) for x in rows)
    lines = []
    for name, value, target, ok in rows:
        if not (value or target or ok):
            lines.append(name)
        else:
            lines.append(f"{name:<{w0}}  {value:<{w1}}  {target:<{w2}}  {ok}".rstrip())
    return "\n".join(lines)


# --- profiling -----------------------------------------------------------------------------


def profile(seconds: int, concurrency: int, bot: str, stream: bool = True) -> None:
    """A streaming (or non-streamed) load under py-spy; self time by layer (see
    profile_report.py)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    import profile_report

    poe = PoeServer()
    try:
        with running(addon_mitmdump(poe)) as m:
            pid, port = pid_of(m), m.reverse_port or 0
            body = chat_body(bot, stream)
            done = b"[DONE]" if stream else b'"finish_reason"'
            asyncio.run(load(pid, port, body, concurrency, concurrency * 4, done))
            raw = BENCH / "profile.txt"
            stop = threading.Event()

            def keep_loading() -> None:
                while not stop.is_set():
                    try:
                        asyncio.run(load(pid, port, body, concurrency, concurrency * 8, done))
                    except Exception:  # mitmdump stopped under it: the profile is done
                        return

            # A thread of this process: the load generator stays out of mitmdump's process.
            threading.Thread(target=keep_loading, daemon=True).start()
            time.sleep(1)
            log(f"py-spy on mitmdump pid {pid} for {seconds} s ({bot}, c={concurrency})")
            # --gil: only samples holding the GIL, i.e. Python code running, not waiting.
            record = ["record", "-p", str(pid), "-d", str(seconds), "-r", "200", "--gil"]
            subprocess.run([py_spy, *record, "-f", "raw", "-o", str(raw)], check=True)
            stop.set()
    finally:
        poe.stop()
    print(profile_report.report(raw.read_text()))


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (< 60 s)")
    parser.add_argument(
        "--profile", nargs="?", const=30, type=int, metavar="SECONDS", help="profile instead"
    )
    parser.add_argument("--profile-bot", default="Hi", help="the bot streamed while profiling")
    parser.add_argument("--profile-concurrency", type=int, default=16)
    parser.add_argument(
        "--profile-json", action="store_true", help="profile non-streamed requests instead"
    )
    parser.add_argument("--out", default=str(BENCH / "results.json"))
    parser.add_argument(
        "--peers-only", action="store_true", help="only 6. (the bridge and the plain server)"
    )
    args = parser.parse_args()
    raise_client_open_files()
    if args.profile:
        profile(args.profile, args.profile_concurrency, args.profile_bot, not args.profile_json)
        return

    from peers import peers

    plan = QUICK if args.quick else FULL
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results: dict[str, Any] = {}
    poe = PoeServer()
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        with running(addon_mitmdump(poe)) as m:
            log(f"stand-in Poe pid {poe.proc.pid}, mitmdump with the addon pid {pid_of(m)}")
            steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                ("first_token", lambda: first_token(plan, m, poe)),
                ("per_token", lambda: per_token(plan, m, poe)),
            ]
            for name, fn in steps if not args.peers_only else []:
                log(f"{name}...")
                results[name] = fn()
            capture_canned(m, tmp / "canned.json")
            with running(canned_mitmdump(tmp / "canned.json")) as canned:
                if not args.peers_only:
                    log(f"cpu per request (floor mitmdump pid {pid_of(canned)})...")
                    results["cpu"] = cpu_per_request(plan, m, canned, poe)
                log("peers: minimal bridge, plain server, addon, canned mitmdump...")
                results["peers"] = peers(plan, m, canned, poe)
        if not args.peers_only:
            log("long answers and long prompts (fresh mitmdump)...")
            results["long"] = long_answers(plan, poe)
            log("scale (fresh mitmdump)...")
            results["scale"] = scale(plan, poe)
    finally:
        poe.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - started
    rows = table(results)
    text = render(rows)
    header = (
        f"poe-openai bench ({'quick' if args.quick else 'full'}) | {platform.node()} | "
        f"{os.cpu_count()} cores | load avg before {load_before:.2f} | "
        f"took {elapsed:.0f} s"
    )
    print(header)
    print(text)
    Path(args.out).write_text(
        json.dumps(
            {
                "mode": "quick" if args.quick else "full",
                "plan": asdict(plan),
                "elapsed_s": r(elapsed, 1),
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "results": results,
                "table": [
                    dict(zip(("figure", "value", "target", "verdict"), x, strict=True))
                    for x in rows
                ],
            },
            indent=1,
        )
    )
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
