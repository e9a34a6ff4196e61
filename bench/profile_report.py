"""Self time by layer from a py-spy ``--format raw`` profile (collapsed stacks).

    .venv/bin/python bench/profile_report.py bench/profile.txt

Each sample's leaf frame is its self time. It is charged to the innermost frame on its stack
that belongs to a layer we own or chose (the addon, mitmproxy, uvicorn/starlette,
fastapi-poe/httpx), so time in shared code (h11, pydantic, asyncio's transports, json,
logging) goes to whoever called it. Samples whose nearest owner is the event loop itself are
"asyncio event loop"; samples from other threads with no owner are "other threads". Samples
inside stdlib logging (or in the add_log hook mitmproxy runs for every log record) form their
own layer, "logging", whoever logged.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

ADDON_FILES = {p.name for p in (Path(__file__).resolve().parent.parent / "addon").glob("*.py")}
LAYERS = (
    ("mitmproxy", ("mitmproxy/", "mitmproxy_rs/")),
    ("uvicorn/starlette", ("uvicorn/", "starlette/")),
    ("fastapi-poe/httpx", ("fastapi_poe/", "httpx/", "httpcore/", "httpx_sse/", "anyio/")),
)
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")
LOOP = ("Handle._run (asyncio/events.py", "BaseEventLoop._run_once (asyncio/base_events.py")
# mitmproxy hands every log record to its addons as an add_log hook, via call_soon_threadsafe:
# such a hook runs straight from the event loop.
ADD_LOG = "AddonManager.trigger (mitmproxy/addonmanager.py"
# A thread-pool worker waiting for work: idle, though py-spy may not see it as idle.
IDLE = ("_worker (concurrent/futures/thread.py:89)",)


def parse_frame(frame: str) -> tuple[str, str, str]:
    m = FRAME.match(frame)
    if m is None:
        return frame, "", ""
    return m["func"], m["file"], m["line"] or ""


def layer_of(file: str) -> str | None:
    if file.startswith("addon/") or ("/" not in file and file in ADDON_FILES):
        return "addon"
    for name, prefixes in LAYERS:
        if file.startswith(prefixes) or any(f"/{p}" in file for p in prefixes):
            return name
    return None


def is_logging(frames: list[str]) -> bool:
    if any(parse_frame(f)[1].startswith("logging/") for f in frames):
        return True
    return any(a.startswith(LOOP[0]) and b.startswith(ADD_LOG) for a, b in pairwise(frames))


def owner(frames: list[str]) -> str:
    if is_logging(frames):
        return "logging (records, and mitmproxy's add_log hook per record)"
    for frame in reversed(frames):
        if frame.startswith(LOOP):
            return "asyncio event loop"
        layer = layer_of(parse_frame(frame)[1])
        if layer is not None:
            return layer
    return "other threads"


def analyse(raw: str) -> tuple[int, Counter[str], dict[str, Counter[str]], Counter[str]]:
    total = 0
    per_layer: Counter[str] = Counter()
    self_time: dict[str, Counter[str]] = defaultdict(Counter)
    addon_inclusive: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if frames[-1].startswith(IDLE):
            continue
        total += n
        who = owner(frames)
        per_layer[who] += n
        func, file, _ = parse_frame(frames[-1])
        self_time[who][f"{func} ({file})"] += n
        seen = set()
        for frame in frames:
            func, file, lineno = parse_frame(frame)
            if layer_of(file) == "addon":
                key = f"{func} ({file}:{lineno})"
                if key not in seen:
                    seen.add(key)
                    addon_inclusive[key] += n
    return total, per_layer, self_time, addon_inclusive


def report(raw: str, top: int = 10) -> str:
    total, per_layer, self_time, addon_inclusive = analyse(raw)
    if not total:
        return "no samples"
    out = [f"{total} samples (active threads only; idle waits are not sampled)", ""]
    out.append("Self time charged to each layer (including shared code it called):")
    for layer, n in per_layer.most_common():
        out.append(f"  {100 * n / total:5.1f}%  {layer}")
    for layer, _ in per_layer.most_common():
        out.append("")
        out.append(f"Top {top} self-time functions charged to {layer}:")
        for key, n in self_time[layer].most_common(top):
            out.append(f"  {100 * n / total:5.1f}%  {key}")
    out.append("")
    out.append(f"Top {top} addon lines by inclusive time (the addon's share of the stack):")
    for key, n in addon_inclusive.most_common(top):
        out.append(f"  {100 * n / total:5.1f}%  {key}")
    return "\n".join(out)


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "profile.txt")
    print(report(path.read_text()))


if __name__ == "__main__":
    main()
