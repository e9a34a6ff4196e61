"""Shared pytest fixtures: one stand-in Poe server and mitmdump processes for the session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fake_poe import FakePoe
from harness import Mitmdump

POE_KEY = "poe-test-key"
ACCESS_TOKEN = "client-token-1"


@pytest.fixture(scope="session")
def fake_poe() -> Iterator[FakePoe]:
    """A running FakePoe shared by all tests (use distinct bot names, see `bot`)."""
    with FakePoe(api_keys=(POE_KEY, "poe-second-key")) as fake:
        yield fake


def poe_options(fake: FakePoe, **extra: str) -> dict[str, str]:
    return {"poe_base_url": fake.base_url, "poe_upload_url": fake.upload_url, **extra}


@pytest.fixture(scope="session")
def proxy(fake_poe: FakePoe) -> Iterator[Mitmdump]:
    """Configured Poe key (from POE_API_KEY), no access tokens: any client is accepted.

    Started with connection_strategy=eager, which the addon must override: with eager,
    mitmproxy would try to reach api.openai.com (offline here) before any hook runs.
    """
    opts = poe_options(fake_poe, connection_strategy="eager", poe_max_file_mb="1")
    with Mitmdump(options=opts, env={"POE_API_KEY": POE_KEY}) as m:
        yield m


@pytest.fixture(scope="session")
def proxy_tokens(fake_poe: FakePoe) -> Iterator[Mitmdump]:
    """Configured Poe key and access tokens: clients must present a token."""
    opts = poe_options(fake_poe, poe_api_key=POE_KEY, poe_access_tokens=ACCESS_TOKEN)
    with Mitmdump(options=opts, regular=False) as m:
        yield m


@pytest.fixture(scope="session")
def proxy_passthrough(fake_poe: FakePoe) -> Iterator[Mitmdump]:
    """No configured key: the client's own Bearer key is its Poe key."""
    with Mitmdump(options=poe_options(fake_poe), regular=False) as m:
        yield m


@pytest.fixture
def bot() -> str:
    """A bot name no other test uses, so tests can share one stand-in Poe server."""
    return "Bot-" + uuid.uuid4().hex[:10]
