"""What the proxy is doing, for the status command, SIGUSR1 and tests: plain data only."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

from addon.service import Service


def rss_mb() -> float | None:
    """Resident memory now (Linux), else the peak (other Unix), else None (Windows)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError, AttributeError):  # (no os.sysconf on Windows)
        pass
    try:
        import resource  # Unix only
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def status(service: Service) -> dict[str, Any]:
    settings = service.settings
    try:
        all_tasks = asyncio.all_tasks()
    except RuntimeError:
        all_tasks = set()
    kinds = Counter(getattr(t.get_coro(), "__qualname__", "?") for t in all_tasks)
    return {
        "answering": sorted(settings.hosts),
        "auth": settings.auth_mode,
        "mappings": {"file": str(settings.mappings_path), "models": len(service.model_map.models)},
        "keys": service.pool.status(),
        "counts": dict(sorted(service.stats.items())),
        "in_flight": len(service.running),
        "awaiting_app": len(service.routed),
        "state": service.state.describe(),
        "responses_stored": service.state.stored_count(),
        "uploads_cached": len(service.poe._uploaded),
        "asyncio_tasks": len(all_tasks),
        "asyncio_task_kinds": dict(kinds.most_common(5)),
        "rss_mb": rss_mb(),
    }
