"""Daily use: answered flows explain themselves, content views, status, live mapping reloads."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, error, text
from harness import Mitmdump
from mitmproxy import contentviews
from mitmproxy import io as mitmio

from addon.views import OpenAIStreamView, PoeQueryView, assemble

USER = [{"role": "user", "content": "hi there"}]


def test_flows_carry_comment_views_and_stored_stream(
    fake_poe: FakePoe, bot: str, tmp_path: Path
) -> None:
    fake_poe.script(bot, [text("Hello"), text(" world")])
    broken = bot + "-broken"
    fake_poe.script(broken, [text("so far"), error("Internal server error")])
    flows = tmp_path / "flows.mitm"
    opts = poe_options(fake_poe, poe_api_key=POE_KEY)
    with Mitmdump(options=opts, regular=False, extra_args=["-w", str(flows)]) as m:
        client = m.reverse_client()
        list(client.chat.completions.create(model=bot, messages=USER, stream=True))
        with contextlib.suppress(Exception):
            list(client.chat.completions.create(model=broken, messages=USER, stream=True))
    with flows.open("rb") as f:
        good, bad = list(mitmio.FlowReader(f).stream())
    assert good.marked
    comment = good.comment
    assert f"Poe bot {bot}" in comment and "key#" in comment
    assert "first event" in comment and "total" in comment and "tokens" in comment
    assert POE_KEY not in comment
    assert "error: 502 poe_error" in bad.comment

    # the streamed body was kept, and the stream view assembles it
    assert b"data: [DONE]" in good.response.content
    view = OpenAIStreamView()
    meta = contentviews.Metadata(
        flow=good, http_message=good.response, content_type="text/event-stream"
    )
    assert view.render_priority(good.response.content, meta) > 1
    assert "Hello world" in view.prettify(good.response.content, meta)
    assert "[error]" in assemble(bad.response.content)

    # the Poe query view shows what the request became
    query_view = PoeQueryView()
    meta = contentviews.Metadata(flow=good, http_message=good.request)
    assert query_view.render_priority(good.request.content, meta) > 1
    rendered = query_view.prettify(good.request.content, meta)
    assert '"role": "user"' in rendered and "hi there" in rendered


def test_log_does_not_claim_answers_stream_from_openai(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    # mitmproxy notes "Streaming response from api.openai.com." for every stream; for the
    # addon's answers that is untrue, so that line goes and the addon's own line stays.
    fake_poe.script(bot, [text("Hello")])
    before = len(proxy.lines)
    for client in (proxy.reverse_client(), proxy.proxy_client()):
        list(client.chat.completions.create(model=bot, messages=USER, stream=True))
    deadline = time.monotonic() + 5
    while sum("streamed in" in x and bot in x for x in proxy.lines[before:]) < 2:
        assert time.monotonic() < deadline, "no 'streamed in' lines"
        time.sleep(0.02)
    time.sleep(0.2)  # mitmproxy's line would have come before the addon's
    lines = proxy.lines[before:]
    assert not [line for line in lines if "Streaming response from" in line]


def test_status_on_sigusr1(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("ok")])
    proxy.reverse_client().chat.completions.create(model=bot, messages=USER)
    status = proxy.status()
    assert status["auth"] == "configured keys"
    assert status["mappings"]["models"] > 40  # type: ignore[index]
    assert status["keys"][0]["key"].startswith("key#")  # type: ignore[index]
    assert POE_KEY not in str(status)
    assert any(k.endswith("/chat/completions") for k in status["counts"])  # type: ignore[union-attr]


def test_mappings_reload_when_the_file_changes(fake_poe: FakePoe, bot: str, tmp_path: Path) -> None:
    mapping = tmp_path / "map.yaml"
    mapping.write_text("models:\n  my-model: Bot-A\n")
    fake_poe.script(bot, [text("from the new bot")])
    opts = poe_options(fake_poe, poe_api_key=POE_KEY, poe_mappings=str(mapping))
    with Mitmdump(options=opts, regular=False) as m:
        client = m.reverse_client()
        assert [x.id for x in client.models.list().data] == ["my-model"]
        time.sleep(1.1)  # a new mtime for sure
        mapping.write_text(f"models:\n  my-model: {bot}\n  other: Bot-B\n")
        deadline = time.monotonic() + 10
        while len(client.models.list().data) != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        result = client.chat.completions.create(model="my-model", messages=USER)
        assert result.choices[0].message.content == "from the new bot"
        # a broken file is reported with its line and the previous map stays
        mapping.write_text("models:\n  my-model: [broken\n")
        deadline = time.monotonic() + 10
        while "keeping the previous map" not in m.output and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "map.yaml, line" in m.output and "keeping the previous map" in m.output
        assert len(client.models.list().data) == 2


def test_start_up_banner_gives_client_settings(proxy: Mitmdump) -> None:
    out = proxy.output
    assert "auth: configured keys" in out and "mapped models" in out
    assert f"base URL http://127.0.0.1:{proxy.reverse_port}/v1" in out
    assert f"HTTPS_PROXY=http://127.0.0.1:{proxy.proxy_port}" in out
    assert "mitmproxy-ca-cert.pem" in out
