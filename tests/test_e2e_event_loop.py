"""One client's long text must not stall everyone else's answers: the proxy counts tokens on
the event loop every stream shares, and counting a megabyte takes about half a second."""

from __future__ import annotations

import base64
import itertools
import os
import threading
import time

import pytest
from fake_poe import FakePoe, sleep, text
from harness import Mitmdump

pytestmark = pytest.mark.fake_poe_only(reason="timing of the proxy's own loop: one stand-in")


@pytest.mark.parametrize("endpoint", ["chat", "completions", "responses"])
def test_counting_a_long_text_does_not_stall_other_streams(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, endpoint: str
) -> None:
    paced, long_bot = bot + "-paced", bot + "-long"
    fake_poe.script(paced, [x for _ in range(30) for x in (text("."), sleep(0.05))])
    fake_poe.script(long_bot, [text("ok")])
    # random base64: the costliest text to count (few merges), 3 MB
    blob = base64.b64encode(os.urandom(2_200_000)).decode()
    client = proxy.reverse_client()
    done = threading.Event()

    def send_long() -> None:
        try:
            if endpoint == "chat":
                client.chat.completions.create(
                    model=long_bot, messages=[{"role": "user", "content": blob}]
                )
            elif endpoint == "completions":
                client.completions.create(model=long_bot, prompt=blob)
            else:
                client.responses.create(model=long_bot, input=blob)
        finally:
            done.set()

    stamps: list[float] = []
    stream = client.chat.completions.create(
        model=paced, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    sender = threading.Thread(target=send_long)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.monotonic())
            if len(stamps) == 3:
                sender.start()
    sender.join(30)
    assert done.is_set()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    print(endpoint, [round(g, 3) for g in gaps])
    # The paced bot writes every 50 ms; counting 3 MB on the loop held it ~0.5 s or more.
    assert max(gaps) < 0.3, [round(g, 3) for g in gaps]
