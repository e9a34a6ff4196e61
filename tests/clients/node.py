"""Runs the JavaScript clients in this folder with ``node``: a JSON result on stdout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


def require_node_packages() -> str:
    """``node``'s path; a clear failure (not a skip) when Node or the pinned packages are
    missing: .ci/run installs both."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node is not installed: the client tests need Node.js 20 or newer (e.g. "
            "'apt-get install nodejs npm'), then 'npm ci --prefix tests/clients'.",
            pytrace=False,
        )
    if not (HERE / "node_modules" / "ai").is_dir():
        pytest.fail(
            "the JavaScript clients are not installed: run 'npm ci --prefix tests/clients' "
            "(versions pinned in tests/clients/package-lock.json).",
            pytrace=False,
        )
    return node


def run_node(
    script: str, config: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 60
) -> dict[str, Any]:
    node = require_node_packages()
    # Only what a user's shell would hold: no proxy unless the test gives one.
    base = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    done = subprocess.run(
        [node, str(HERE / script), json.dumps(config)],
        cwd=HERE,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)  # type: ignore[no-any-return]
