"""Connections to Poe: reused between queries, never held by a server that keeps a body open."""

from __future__ import annotations

import time

import pytest
from fake_poe import FakePoe, no_done, raw, sleep, text
from harness import Mitmdump

USER = [{"role": "user", "content": "hi"}]
QUERIES = 8


@pytest.mark.parametrize("stream", [False, True])
def test_sequential_queries_reuse_one_poe_connection(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    # fastapi-poe stops reading at "done"; without finishing the body, httpx drops the
    # connection and every query opens a new one.
    fake_poe.script(bot, [text("Hello"), text(" world")])
    with proxy.http() as http:
        for _ in range(QUERIES):
            r = http.post(
                "/v1/chat/completions", json={"model": bot, "messages": USER, "stream": stream}
            )
            assert r.status_code == 200 and "world" in r.text
    clients = {rec.client for rec in fake_poe.requests_for(bot)}
    assert len(fake_poe.requests_for(bot)) == QUERIES
    assert len(clients) <= 2, f"{QUERIES} queries over {len(clients)} connections"


@pytest.mark.parametrize("stream", [False, True])
def test_a_body_left_open_after_done_neither_delays_the_answer_nor_holds_the_connection(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    fake_poe.script(bot, [text("Hello"), raw("event: done\ndata: {}\n\n"), sleep(30), no_done()])
    with proxy.http() as http:
        assert http.get("/v1/models").status_code == 200  # a warm proxy: timing is the point
        started = time.monotonic()
        r = http.post(
            "/v1/chat/completions", json={"model": bot, "messages": USER, "stream": stream}
        )
        took = time.monotonic() - started
    assert r.status_code == 200 and "Hello" in r.text
    assert took < 1.0
    # The addon gives up on the rest of the body after a bounded wait (2 s).
    assert fake_poe.wait_for(lambda: fake_poe.requests_for(bot)[0].disconnected is not None, 5)
