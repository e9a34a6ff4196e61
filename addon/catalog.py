"""The bots Poe publishes: its OpenAI-compatible model list (``GET https://api.poe.com/v1/models``,
public, no key), learned in the background at start-up so that a model name the map does not
hold still finds its bot however the client spells it ("gpt-5-mini" -> "GPT-5-mini").

Nothing waits for it: until it arrives (or when Poe cannot be reached) the map alone decides.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import httpx

logger = logging.getLogger(__name__)

# Poe bot names are URL path segments (the same rule as mappings.BOT_NAME).
BOT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_LIST_BYTES = 8 * 1024 * 1024  # Poe's list is ~100 KB; a bigger answer is not that list
MAX_BOTS = 20_000
FETCH_TIMEOUT_S = 30


class CatalogError(ValueError):
    """Poe's answer is not the model list."""


def parse_model_list(data: object) -> list[str]:
    """The bot ids of an OpenAI-style model list ``{"object": "list", "data": [{"id": ...}]}``,
    in order, without repeats; entries that are not usable bot names are skipped."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise CatalogError('not a model list (expected {"object": "list", "data": [...]})')
    seen: dict[str, None] = {}
    for entry in data["data"]:
        name = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(name, str) and BOT_ID.match(name):
            seen.setdefault(name, None)
    if len(seen) > MAX_BOTS:
        raise CatalogError(f"{len(seen)} models: more than the {MAX_BOTS} a model list holds")
    return list(seen)


class PoeBots:
    """Poe's published bot names; shared by every model map the proxy loads (a reload of the
    map keeps what was learned)."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self._folded: dict[str, str] = {}
        self.source = ""
        self.state = "off"  # off | fetching | learned | failed

    def learn(self, names: list[str], source: str) -> None:
        folded: dict[str, str] = {}
        for name in names:
            folded.setdefault(name.casefold(), name)
        self.names, self._folded, self.source, self.state = tuple(names), folded, source, "learned"

    def forget(self, state: str = "off") -> None:
        self.names, self._folded, self.state = (), {}, state

    def match(self, model: str) -> str | None:
        """Poe's spelling of ``model``, if Poe publishes a bot of that name in any case."""
        return self._folded.get(model.casefold())

    def __len__(self) -> int:
        return len(self.names)

    def status(self) -> dict[str, Any]:
        return {"source": self.source, "state": self.state, "bots": len(self.names)}


async def fetch_model_list(url: str, proxy: str | None) -> list[str]:
    """Poe's bot names from ``url``; raises CatalogError or httpx.HTTPError."""
    # trust_env=False: the environment's HTTPS_PROXY may point at this very proxy (see poe.py)
    async with (
        httpx.AsyncClient(
            proxy=proxy, trust_env=False, timeout=FETCH_TIMEOUT_S, follow_redirects=True
        ) as client,
        client.stream("GET", url, headers={"accept": "application/json"}) as response,
    ):
        if response.status_code != 200:
            raise CatalogError(f"HTTP {response.status_code}")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_LIST_BYTES:
                raise CatalogError(f"the answer is larger than {MAX_LIST_BYTES // 2**20} MB")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise CatalogError("the answer is not JSON") from None
    return parse_model_list(data)


async def learn(bots: PoeBots, url: str, proxy: str | None) -> None:
    """Fetch Poe's list into ``bots``; one log line either way, never an exception."""
    bots.source, bots.state = url, "fetching"
    try:
        names = await fetch_model_list(url, proxy)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # (a background task: whatever failed, the map alone decides)
        why = str(e) if isinstance(e, CatalogError) else f"{type(e).__name__}: {e}".rstrip(": ")
        bots.forget("failed")
        logger.warning(
            "poe-openai: could not fetch Poe's bot list from %s (%s); model names not in the "
            "map go to Poe as written",
            url,
            why,
        )
        return
    bots.learn(names, url)
    logger.info(
        "poe-openai: learned %d Poe bots from %s; model names not in the map match them "
        "whatever their case",
        len(names),
        url,
    )
