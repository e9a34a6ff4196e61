"""Defects found in review, each pinned by a test that failed before its fix."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, http_error, json_event, replace, sleep, text
from harness import Mitmdump
from mitmproxy import io as mitmio

USER = [{"role": "user", "content": "hi"}]


def slow(n: int = 20) -> list[object]:
    return [text("start")] + [s for _ in range(n) for s in (sleep(0.25), text("."))]


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_before_the_answer_drops_the_poe_query(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    # Non-streamed: the client gives up while Poe is still answering. Streamed: the client
    # gives up while Poe is still silent (before the first event).
    fake_poe.script(bot, slow() if not stream else [sleep(3.0), *slow()])  # type: ignore[list-item]
    body = {"model": bot, "messages": USER, "stream": stream}
    with proxy.http() as http:
        assert http.get("/v1/models").status_code == 200  # a warm proxy: timing is the point
    with pytest.raises(httpx.ReadTimeout), proxy.http(timeout=1.0) as http:
        http.post("/v1/chat/completions", json=body)
    left = time.monotonic()
    assert fake_poe.wait_for(lambda: fake_poe.requests_for(bot)[0].disconnected is not None, 3)
    seen = fake_poe.requests_for(bot)[0]
    assert seen.finished is None
    assert seen.disconnected is not None and seen.disconnected - left < 0.5


def test_keys_not_saved_even_for_flows_cut_by_shutdown(
    fake_poe: FakePoe, bot: str, tmp_path: Path
) -> None:
    flows = tmp_path / "flows.mitm"
    fake_poe.script(bot, [sleep(30), text("late")])
    m = Mitmdump(options=poe_options(fake_poe), extra_args=["-w", str(flows)]).start()

    def ask() -> None:
        try:
            with m.http(timeout=20) as http:
                http.post(
                    "/v1/chat/completions",
                    json={"model": bot, "messages": USER},
                    headers={"authorization": f"Bearer {POE_KEY}"},
                )
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=ask)
    thread.start()
    assert fake_poe.wait_for(lambda: bool(fake_poe.requests_for(bot)), 10)
    m.stop()
    thread.join()
    data = flows.read_bytes()
    assert POE_KEY.encode() not in data
    with flows.open("rb") as f:
        saved = list(mitmio.FlowReader(f).stream())
    assert saved and all("redacted key#" in f.request.headers["authorization"] for f in saved)


def test_b64_images_never_fetch_links_from_the_bots_text(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    secret = fake_poe.host_file(f"{bot}-internal", b"INTERNAL-ONLY", "image/png")
    fake_poe.script(bot, [text(f"![x]({secret})")])  # a link in text, not a Poe file event
    before = len(fake_poe.downloads)
    with pytest.raises(openai.APIStatusError) as info:
        proxy.reverse_client().images.generate(model=bot, prompt="x", response_format="b64_json")
    assert info.value.status_code == 502
    assert len(fake_poe.downloads) == before


@pytest.mark.parametrize("stream", [False, True])
def test_json_mode_with_a_tool_call_answer(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    call = {
        "index": 0,
        "id": "c1",
        "type": "function",
        "function": {"name": "f", "arguments": "{}"},
    }
    fake_poe.script(bot, [json_event({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})])
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
    }
    client = proxy.reverse_client()
    kwargs = {
        "model": bot,
        "messages": USER,
        "tools": [tool],
        "response_format": {"type": "json_object"},
    }
    if stream:
        with client.chat.completions.stream(**kwargs) as s:  # type: ignore[arg-type]
            result = s.get_final_completion()
    else:
        result = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert result.choices[0].finish_reason == "tool_calls"
    assert result.choices[0].message.tool_calls[0].function.name == "f"


def test_responses_non_streamed_gets_poes_final_text(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("Draft answer"), replace("Final answer")])
    client = proxy.reverse_client()
    made = client.responses.create(model=bot, input="hi")
    assert made.output_text == "Final answer"
    assert client.chat.completions.create(model=bot, messages=USER).choices[0].message.content == (
        "Final answer"
    )


def test_non_ascii_token_is_401_not_500(proxy_tokens: Mitmdump) -> None:
    with proxy_tokens.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={"model": "x", "messages": USER},
            headers={"authorization": b"Bearer t\xf6k"},
        )
    assert r.status_code == 401
    assert "Traceback" not in proxy_tokens.output


def test_models_need_no_usable_key(fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [http_error(402, {"detail": "no points"})])
    with Mitmdump(options=poe_options(fake_poe, poe_api_key=POE_KEY), regular=False) as m:
        client = m.reverse_client()
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=bot, messages=USER)
        assert client.models.list().data  # no Poe key is spent or needed to list models


def test_n_choices_are_separate_poe_queries(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("x")])
    proxy.reverse_client().chat.completions.create(model=bot, messages=USER, n=3)
    ids = {r.body["message_id"] for r in fake_poe.requests_for(bot)}
    assert len(ids) == 3


def test_addon_made_errors_carry_cors(fake_poe: FakePoe, bot: str) -> None:
    with (
        Mitmdump(
            options=poe_options(fake_poe, poe_api_key=POE_KEY, poe_max_body_mb="1"), regular=False
        ) as m,
        m.http() as http,
    ):
        r = http.post(
            "/v1/chat/completions",
            content=json.dumps({"x": "y" * 2_000_000}),
            headers={"origin": "http://localhost:3000"},
        )
    assert r.status_code == 413
    assert r.headers["access-control-allow-origin"] == "*"
