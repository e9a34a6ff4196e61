"""Auth modes, start-up validation, secrets kept out of logs and saved flows, cancellation."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
from conftest import ACCESS_TOKEN, POE_KEY, poe_options
from fake_poe import FakePoe, sleep, text
from harness import Mitmdump
from mitmproxy import io as mitmio

USER = [{"role": "user", "content": "hi"}]
pytestmark = pytest.mark.both_transports  # answers given in-process and over the loopback hop


def test_access_tokens_are_required_and_never_forwarded(
    proxy_tokens: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("ok")])
    with proxy_tokens.http() as http:  # no key at all
        r = http.post("/v1/chat/completions", json={"model": bot, "messages": USER})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for key in ("wrong-token", POE_KEY):
        client = proxy_tokens.reverse_client(api_key=key)
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model=bot, messages=USER)
        assert info.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    assert fake_poe.requests_for(bot) == []
    result = proxy_tokens.reverse_client(api_key=ACCESS_TOKEN).chat.completions.create(
        model=bot, messages=USER
    )
    assert result.choices[0].message.content == "ok"
    [seen] = fake_poe.requests_for(bot)
    assert seen.api_key == POE_KEY


def test_configured_key_accepts_any_client(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("ok")])
    with proxy.http() as http:  # no Authorization header at all
        r = http.post("/v1/chat/completions", json={"model": bot, "messages": USER})
    assert r.status_code == 200
    assert fake_poe.requests_for(bot)[0].api_key == POE_KEY


def test_pass_through_uses_the_clients_key(
    proxy_passthrough: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("ok")])
    client = proxy_passthrough.reverse_client(api_key="poe-second-key")
    assert client.chat.completions.create(model=bot, messages=USER).choices[0].message.content
    assert fake_poe.requests_for(bot)[0].api_key == "poe-second-key"
    with proxy_passthrough.http() as http:
        r = http.post("/v1/chat/completions", json={"model": bot, "messages": USER})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_several_configured_keys_are_used_in_turn(fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("ok")])
    opts = poe_options(fake_poe, poe_api_key=f"{POE_KEY},poe-second-key")
    with Mitmdump(options=opts, regular=False) as m:
        client = m.reverse_client()
        for _ in range(4):
            client.chat.completions.create(model=bot, messages=USER)
    keys = [r.api_key for r in fake_poe.requests_for(bot)]
    assert sorted(keys) == sorted([POE_KEY, "poe-second-key"] * 2)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"poe_access_tokens": "t1"}, "poe_access_tokens"),
        ({"poe_base_url": "ftp://nowhere"}, "poe_base_url"),
        ({"poe_proxy": "gopher://x"}, "poe_proxy"),
        ({"poe_mappings": "/no/such/map.yaml"}, "poe_mappings"),
        ({"poe_stream_store_limit": "-1"}, "poe_stream_store_limit"),
    ],
)
def test_bad_options_stop_start_up_with_a_message(options: dict[str, str], needle: str) -> None:
    m = Mitmdump(options=options, regular=False)
    with pytest.raises(RuntimeError, match="exited"):
        m.start()
    assert m.proc is not None and m.proc.returncode != 0
    assert needle in m.output


def test_broken_mapping_file_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "map.yaml"
    bad.write_text("models:\n  gpt-4o: GPT-4o\n  oops: [\n")
    m = Mitmdump(options={"poe_mappings": str(bad)}, regular=False)
    with pytest.raises(RuntimeError):
        m.start()
    assert "map.yaml, line" in m.output


def test_keys_never_reach_logs_or_saved_flows(fake_poe: FakePoe, bot: str, tmp_path: Path) -> None:
    fake_poe.script(bot, [text("secret-free answer")])
    flows = tmp_path / "flows.mitm"
    client_key = "poe-second-key"
    opts = poe_options(fake_poe, flow_detail="4")
    with Mitmdump(options=opts, extra_args=["-w", str(flows)]) as m:
        m.reverse_client(api_key=client_key).chat.completions.create(model=bot, messages=USER)
        stream = m.proxy_client(api_key=client_key).chat.completions.create(
            model=bot, messages=USER, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        with m.http() as http:  # a rejected key is not echoed either
            http.post(
                "/v1/chat/completions",
                headers={"authorization": "Bearer sk-leak-me"},
                json={"model": "x", "messages": "bad"},
            )
    assert "secret-free answer" in m.output  # the log does show bodies at this detail
    for secret in (client_key, "sk-leak-me"):
        assert secret not in m.output
        assert secret.encode() not in flows.read_bytes()
    with flows.open("rb") as f:
        saved = list(mitmio.FlowReader(f).stream())
    assert len(saved) == 3
    for flow in saved:
        assert flow.request.host == "api.openai.com"  # the original URL, not loopback
        assert "redacted key#" in flow.request.headers["authorization"]
        assert "x-poe-openai-route" not in flow.request.headers
    streamed = [f for f in saved if b"data: [DONE]" in (f.response.content or b"")]
    assert streamed, "the streamed answer is kept on the flow for inspection"


def test_client_disconnect_cancels_the_poe_query(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("start")] + [s for _ in range(40) for s in (sleep(0.25), text("."))])
    stream = proxy.reverse_client().chat.completions.create(model=bot, messages=USER, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content == "start":
            break
    closed = time.monotonic()
    stream.close()
    assert fake_poe.wait_for(lambda: fake_poe.requests_for(bot)[0].disconnected is not None, 5)
    seen = fake_poe.requests_for(bot)[0]
    assert seen.disconnected is not None and seen.disconnected - closed < 1.0
    assert seen.finished is None
