"""The mitmproxy glue at hook level (mitmproxy.test.taddons / tflow)."""

from __future__ import annotations

import gc
import json
import logging

from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow

from addon import gctune
from addon.poe_openai import PoeOpenAI, redact
from addon.quietlog import OwnStreamNotices


def openai_flow(host: str = "api.openai.com") -> object:
    f = tflow.tflow()
    f.request.scheme = "https"
    f.request.host = host
    f.request.port = 443
    f.request.path = "/v1/chat/completions"
    f.request.headers["authorization"] = "Bearer sk-secret-value"
    return f


def test_configure_forces_lazy_connections() -> None:
    addon = PoeOpenAI()
    with taddons.context(Proxyserver(), addon) as tctx:
        tctx.configure(
            addon, connection_strategy="eager", poe_api_key="k", mode=["regular@127.0.0.1:8080"]
        )
        assert tctx.options.connection_strategy == "lazy"


def test_fails_closed_when_the_app_cannot_be_reached() -> None:
    addon = PoeOpenAI()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, poe_api_key="k", mode=["regular@127.0.0.1:8080"])
        flow = openai_flow()
        addon.requestheaders(flow)  # no loopback server running: routing fails
        assert flow.response is not None and flow.response.status_code == 500
        body = json.loads(flow.response.content)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert "sk-secret-value" not in str(flow.request.headers)


def test_other_hosts_are_left_alone() -> None:
    addon = PoeOpenAI()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, poe_api_key="k", mode=["regular@127.0.0.1:8080"])
        flow = openai_flow("example.com")
        addon.requestheaders(flow)
        assert flow.response is None
        assert flow.request.host == "example.com"
        assert "poe_openai" not in flow.metadata


def test_redact_keeps_only_a_fingerprint() -> None:
    flow = openai_flow()
    flow.request.headers["api-key"] = "azure-style-secret"
    redact(flow)
    assert flow.request.headers["authorization"].startswith("Bearer [redacted key#")
    assert "azure-style-secret" not in str(flow.request.headers)


def test_open_relay_guard() -> None:
    import pytest
    from mitmproxy import exceptions
    from mitmproxy.addons.proxyauth import ProxyAuth

    addon = PoeOpenAI()
    with taddons.context(Proxyserver(), ProxyAuth(), addon) as tctx:
        # pass-through (no configured key) is not a relay, whatever the listener
        tctx.configure(addon, mode=["regular"])
        with pytest.raises(exceptions.OptionsError) as info:
            tctx.configure(addon, poe_api_key="k")
        message = str(info.value)
        for way_out in ("127.0.0.1", "poe_access_tokens", "proxyauth", "poe_allow_open_relay"):
            assert way_out in message
        tctx.configure(addon, poe_api_key="k", poe_access_tokens=["t"])
        tctx.configure(addon, poe_access_tokens=[], proxyauth="u:p")
        tctx.configure(addon, proxyauth="", mode=["regular@127.0.0.1:8080", "local"])
        tctx.configure(
            addon, mode=["reverse:https://api.openai.com@0.0.0.0:8000"], poe_allow_open_relay=True
        )


def test_only_the_addons_own_stream_notices_are_dropped() -> None:
    notices = OwnStreamNotices()

    def kept(client: object, msg: str) -> bool:
        record = logging.LogRecord("mitmproxy.proxy.server", logging.INFO, "", 0, msg, None, None)
        record.client = client
        return notices.filter(record)

    ours, other = ("127.0.0.1", 5000), ("127.0.0.1", 5001)
    notices.expect(ours, "api.openai.com")
    assert kept(other, "Streaming response from api.openai.com.")  # another connection
    assert kept(ours, "Streaming response from example.com.")  # another host
    assert not kept(ours, "Streaming response from api.openai.com.")
    assert kept(ours, "Streaming response from api.openai.com.")  # one notice per expectation
    notices.expect(ours, "api.openai.com")
    notices.forget(ours, "api.openai.com")  # the flow failed before its notice
    assert kept(ours, "Streaming response from api.openai.com.")
    assert not notices.expected


def test_objects_alive_at_start_up_are_frozen_out_of_collections() -> None:
    # Full collections walked every module, class and table on each pass (~150 ms pauses
    # under load); frozen, they skip them (bench/README.md).
    gc.unfreeze()
    try:
        gctune.tune()
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
