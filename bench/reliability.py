"""Runs the reliability suites (faults, cancellation, load) and prints their figures.

    .venv/bin/python bench/reliability.py

The suites live in tests/ and run in `./run.sh test` too; here they run alone, each recording
its figures (tests/figures.py), and the table below is printed from those records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITES = [
    "tests/test_faults.py",
    "tests/test_cancellation.py",
    "tests/test_fuzz.py",
    "tests/test_load.py",
]


def main() -> int:
    folder = Path(tempfile.mkdtemp(prefix="poe-figures-"))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES],
        cwd=REPO,
        env={**os.environ, "FIGURES_DIR": str(folder)},
        capture_output=True,
        text=True,
    )
    took = time.monotonic() - started
    summary = [
        line for line in result.stdout.splitlines() if " passed" in line or " failed" in line
    ]
    print(f"suites: {', '.join(Path(s).stem for s in SUITES)}  ({took:.0f} s)")
    print(f"pytest: {summary[-1] if summary else result.stdout[-500:]}")
    for path in sorted(folder.glob("*.json")):
        figures = json.loads(path.read_text())
        print(f"\n## {figures.pop('suite')}")
        for key, value in figures.items():
            print(f"  {key}: {json.dumps(value)}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
