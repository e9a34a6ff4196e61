"""Suites record their figures here; bench/reliability.py prints them as a table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def record(suite: str, figures: dict[str, Any]) -> None:
    """Write a suite's figures to $FIGURES_DIR/<suite>.json (nothing when unset)."""
    folder = os.environ.get("FIGURES_DIR")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{suite}.json").write_text(json.dumps({"suite": suite, **figures}, indent=1))
