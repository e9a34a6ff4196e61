"""What the proxy is doing, for the status command, SIGUSR1 and tests: plain data only."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

from addon.catalog import PoeBots
from addon.config import OPTION, Settings, Spelling
from addon.mappings import ModelMap
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
        "poe_bots": service.model_map.published.status(),
        "keys": service.pool.status(),
        "counts": dict(sorted(service.stats.items())),
        "in_flight": len(service.running),
        "awaiting_app": len(service.routed),
        "flow_views_pending": len(service.flow_info),
        "cancelling": len(service.gone),
        "state": service.state.describe(),
        "responses_stored": service.state.stored_count(),
        "responses_stored_mb": stored_mb(service),
        "uploads_cached": len(service.poe._uploaded),
        "asyncio_tasks": len(all_tasks),
        "asyncio_task_kinds": dict(kinds.most_common(5)),
        "rss_mb": rss_mb(),
    }


def summary(
    settings: Settings, model_map: ModelMap, answering: str, spelling: Spelling = OPTION
) -> str:
    """The start-up line, the addon's and the plain server's alike."""
    return (
        f"answering {answering} with Poe ({settings.base_url}) | auth: {settings.auth_mode} | "
        f"{len(model_map.models)} mapped models from {settings.mappings_path} | "
        f"{published_summary(model_map.published, settings.models_url, spelling)}"
    )


def published_summary(published: PoeBots, url: str | None, spelling: Spelling = OPTION) -> str:
    """The banner's word on Poe's bot list (learned in the background: its count follows)."""
    if url is None:
        return f"Poe's bot list: off ({spelling.name('poe_models_url')} is empty)"
    if published.state == "learned" and published.source == url:
        return f"{len(published)} Poe bots learned from {url}"
    return f"learning Poe's bots from {url}"


def client_key_advice(settings: Settings, spelling: Spelling = OPTION) -> str:
    """What a client must send as its API key, in this auth mode."""
    if settings.access_tokens:
        return f"a token from {spelling.name('poe_access_tokens')} (other keys get 401)"
    if settings.api_keys:
        return "any (the proxy's Poe key answers)"
    return "the user's own Poe key, from poe.com/api_key (the proxy holds none)"


def stored_mb(service: Service) -> float | None:
    """The in-process response store's size (Redis keeps its own count)."""
    store = getattr(service.state, "responses", None)
    return None if store is None else round(store.bytes / 2**20, 1)
