"""The official `openai` npm package through the explicit proxy, set up exactly as the start-up
banner's Node line says (tests/clients/openai_node.mjs); and the reason that line exists: with
HTTPS_PROXY and NODE_EXTRA_CA_CERTS alone, Node's fetch never reaches the proxy."""

from __future__ import annotations

import re
import uuid

import pytest
from clients.node import run_node
from fake_poe import FakePoe, text
from harness import Mitmdump

pytestmark = pytest.mark.fake_poe_only(reason="a client test: one stand-in is enough")


def banner_node_line(proxy: Mitmdump) -> str:
    lines = [line for line in proxy.lines if "Node clients" in line]
    assert len(lines) == 1, proxy.output[-3000:]
    return lines[0]


def test_the_banners_node_advice_works_with_the_official_sdk(
    proxy: Mitmdump, fake_poe: FakePoe
) -> None:
    line = banner_node_line(proxy)
    # What the script below does is what the banner says to do.
    assert "NODE_EXTRA_CA_CERTS=" in line and "EnvHttpProxyAgent" in line, line
    assert re.search(r"NODE_USE_ENV_PROXY=1", line), line
    bot = "NodeSDK-" + uuid.uuid4().hex[:8]
    fake_poe.script(bot, [text("Hello "), text("from Poe.")])
    env = {"HTTPS_PROXY": proxy.proxy_url, "NODE_EXTRA_CA_CERTS": str(proxy.ca_file)}
    got = run_node("openai_node.mjs", {"model": bot, "envProxy": True}, env)
    assert got == {"text": "Hello from Poe.", "streamed": "Hello from Poe."}, got
    assert len(fake_poe.requests_for(bot)) == 2


def test_https_proxy_alone_does_not_reach_the_proxy_from_node(
    proxy: Mitmdump, fake_poe: FakePoe
) -> None:
    bot = "NodeSDK-" + uuid.uuid4().hex[:8]
    fake_poe.script(bot, [text("never")])
    before = len(proxy.lines)
    env = {"HTTPS_PROXY": proxy.proxy_url, "NODE_EXTRA_CA_CERTS": str(proxy.ca_file)}
    got = run_node("openai_node.mjs", {"model": bot, "envProxy": False}, env)
    # Node's fetch ignored HTTPS_PROXY and looked api.openai.com up itself (no network here).
    assert got["error"]["name"] == "APIConnectionError", got
    assert fake_poe.requests_for(bot) == []
    assert "api.openai.com" not in "".join(proxy.lines[before:])
