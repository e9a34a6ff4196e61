"""Shared pytest fixtures: one stand-in Poe server and mitmdump processes for the session."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Iterator

import pytest
from fake_poe import FakePoe
from harness import Mitmdump
from poe_reference import PoeReference

POE_KEY = "poe-test-key"
ACCESS_TOKEN = "client-token-1"


# The stand-in Poe servers, by the parameter of the fake_poe fixture. FakePoe's is None, the
# cache key of an unparametrized fixture: tests that run against FakePoe only share its server
# (and the proxies on it) with the FakePoe half of the parametrized ones.
STAND_INS: dict[str | None, type[FakePoe]] = {None: FakePoe, "poe_reference": PoeReference}


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "both_stand_ins: tests (of a module, or one) that ask Poe run against FakePoe and"
        " PoeReference (fastapi-poe's own bot server)",
        "fake_poe_only(reason): in a both_stand_ins module, a test that needs FakePoe's fault"
        " injection",
        "poe_reference_only(reason): in a both_stand_ins module, a test of what only"
        " fastapi-poe's bot server does",
        "both_transports: tests (of a module, or one) on the proxy fixtures run with answers"
        " that need no stream given in-process and with every answer over the loopback hop",
    ):
        config.addinivalue_line("markers", line)
    # fastapi-poe's make_app still calls pydantic's parse_obj: its noise, not ours.
    config.addinivalue_line(
        "filterwarnings", "ignore:The `parse_obj` method is deprecated:DeprecationWarning"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests that script a bot (they take `fake_poe` or `bot`): the others never ask Poe.
    asks_poe = {"fake_poe", "bot"} & set(inspect.signature(metafunc.function).parameters)
    if asks_poe and metafunc.definition.get_closest_marker("both_stand_ins"):
        params = [pytest.param(key, id=key or "fake_poe") for key in STAND_INS]
        metafunc.parametrize("fake_poe", params, indirect=True, scope="session")
    # (the proxy fixtures take `transport`, and so can a module's own mitmdump fixture)
    if "transport" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_transports"
    ):
        metafunc.parametrize("transport", TRANSPORTS, indirect=True, scope="session")


# The addon's two ways to answer (poe_in_process): None, the default, is in-process.
TRANSPORTS = [pytest.param(None, id="in_process"), pytest.param("loopback", id="loopback")]


@pytest.fixture(scope="session")
def transport(request: pytest.FixtureRequest) -> dict[str, str]:
    """Options for the proxy fixtures: {} (answers that need no stream given in-process), or
    every answer over the loopback hop (both_transports modules run both)."""
    return {"poe_in_process": "false"} if getattr(request, "param", None) else {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks (on a test or on one of its parameters) that say which stand-in a test is for.
    A combination they rule out is deselected: it does not exist, it is not a skipped test."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "fake_poe" in params:
            only = "poe_reference_only" if params["fake_poe"] is None else "fake_poe_only"
            if item.get_closest_marker(only):
                dropped.append(item)
                continue
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def fake_poe(request: pytest.FixtureRequest) -> Iterator[FakePoe]:
    """A running stand-in Poe server shared by all tests (use distinct bot names, see `bot`):
    FakePoe, or in both_stand_ins modules also PoeReference (with its own proxies)."""
    stand_in = STAND_INS[getattr(request, "param", None)]
    with stand_in(api_keys=(POE_KEY, "poe-second-key")) as fake:
        yield fake


def poe_options(fake: FakePoe, **extra: str) -> dict[str, str]:
    return {"poe_base_url": fake.base_url, "poe_upload_url": fake.upload_url, **extra}


@pytest.fixture(scope="session")
def proxy(fake_poe: FakePoe, transport: dict[str, str]) -> Iterator[Mitmdump]:
    """Configured Poe key (from POE_API_KEY), no access tokens: any client is accepted.

    Started with connection_strategy=eager, which the addon must override: with eager,
    mitmproxy would try to reach api.openai.com (offline here) before any hook runs.
    """
    opts = poe_options(fake_poe, connection_strategy="eager", poe_max_file_mb="1", **transport)
    with Mitmdump(options=opts, env={"POE_API_KEY": POE_KEY}) as m:
        yield m


@pytest.fixture(scope="session")
def proxy_tokens(fake_poe: FakePoe, transport: dict[str, str]) -> Iterator[Mitmdump]:
    """Configured Poe key and access tokens: clients must present a token."""
    opts = poe_options(fake_poe, poe_api_key=POE_KEY, poe_access_tokens=ACCESS_TOKEN, **transport)
    with Mitmdump(options=opts, regular=False) as m:
        yield m


@pytest.fixture(scope="session")
def proxy_passthrough(fake_poe: FakePoe, transport: dict[str, str]) -> Iterator[Mitmdump]:
    """No configured key: the client's own Bearer key is its Poe key."""
    with Mitmdump(options=poe_options(fake_poe, **transport), regular=False) as m:
        yield m


@pytest.fixture
def bot() -> str:
    """A bot name no other test uses, so tests can share one stand-in Poe server."""
    return "Bot-" + uuid.uuid4().hex[:10]
