"""Fault suite: the stand-in Poe server misbehaves in every way we know; each fault gets the
right status or error event, no text is ever duplicated, and the proxy keeps serving."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from conftest import poe_options
from fake_poe import FakePoe, cut, error, http_error, no_done, raw, sleep, text
from figures import record
from harness import Mitmdump, assert_no_traceback

USER = [{"role": "user", "content": "hi"}]
KEY = "poe-second-key"  # pass-through: key faults stay with this request
WORDS = [f"w{i} " for i in range(6)]
FIGURES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def faulty_proxy(fake_poe: FakePoe) -> Iterator[Mitmdump]:
    opts = poe_options(
        fake_poe,
        poe_first_event_timeout_s="2",
        poe_idle_timeout_s="2",
        poe_total_timeout_s="8",
        poe_header_hold_s="1",
        poe_keepalive_s="1",
    )
    with Mitmdump(options=opts, regular=False) as m:
        yield m
    record("faults", {"figures": dict(FIGURES)})


def words(n: int) -> list[Any]:
    return [text(w) for w in WORDS[:n]]


# name, script, (status, code) before any text; text sent before the fault (for streams)
FAULTS: list[tuple[str, list[Any], tuple[int, str], str]] = [
    ("http 401", [http_error(401, {"detail": "bad key"})], (401, "invalid_api_key"), ""),
    ("http 402", [http_error(402, {"detail": "no points"})], (429, "insufficient_quota"), ""),
    (
        "http 429",
        [http_error(429, {"detail": "slow"}, {"Retry-After": "5"})],
        (429, "rate_limit_exceeded"),
        "",
    ),
    ("http 500", [http_error(500, {"detail": "boom"})], (502, "poe_error"), ""),
    ("http 502", [http_error(502, "bad gateway")], (502, "poe_error"), ""),
    ("http 503", [http_error(503, "unavailable")], (502, "poe_error"), ""),
    (
        "in-band rate limit",
        [error("You have exceeded rate limit for this bot.")],
        (429, "rate_limit_exceeded"),
        "",
    ),
    (
        "in-band out of points",
        [error("Not enough points", error_type="insufficient_fund")],
        (429, "insufficient_quota"),
        "",
    ),
    (
        "in-band internal error",
        [error("Internal server error", allow_retry=True)],
        (502, "poe_error"),
        "",
    ),
    (
        "error after first token",
        [*words(3), error("Internal server error")],
        (502, "poe_error"),
        "".join(WORDS[:3]),
    ),
    ("cut before first token", [cut()], (502, "poe_unreachable"), ""),
    (
        "cut after first token",
        [*words(2), sleep(0.05), cut()],
        (502, "poe_unreachable"),
        "".join(WORDS[:2]),
    ),
    ("stall before first event", [sleep(3), *words(2)], (504, "timeout"), ""),
    ("stall mid-answer", [*words(2), sleep(3), *words(4)], (504, "timeout"), "".join(WORDS[:2])),
    (
        "malformed SSE",
        [*words(1), raw("event: text\ndata: {not json\n\n")],
        (502, "poe_unreachable"),
        WORDS[0],
    ),
    ("no done event", [*words(2), no_done()], (200, ""), "".join(WORDS[:2])),
]


def stream_text(client: openai.OpenAI, bot: str) -> tuple[str, Exception | None]:
    got, failure = "", None
    try:
        for chunk in client.chat.completions.create(model=bot, messages=USER, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                got += chunk.choices[0].delta.content
    except Exception as e:
        failure = e
    return got, failure


@pytest.mark.parametrize(
    ("name", "script", "expected", "before"), FAULTS, ids=[f[0] for f in FAULTS]
)
def test_fault(
    faulty_proxy: Mitmdump,
    fake_poe: FakePoe,
    bot: str,
    name: str,
    script: list[Any],
    expected: tuple[int, str],
    before: str,
) -> None:
    fake_poe.script(bot, script)
    client = faulty_proxy.reverse_client(api_key=KEY)
    status, code = expected
    FIGURES["faults injected"] += 2

    # Not streamed: an HTTP status decided by the fault.
    if status == 200:
        result = client.chat.completions.create(model=bot, messages=USER)
        assert result.choices[0].message.content == before
    else:
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=bot, messages=USER)
        assert (info.value.status_code, info.value.code) == (status, code), name
        FIGURES[f"status {status}"] += 1

    # Streamed: the same status if nothing was sent yet; otherwise the text so far, once,
    # then an error event.
    got, failure = stream_text(client, bot)
    assert got == before, f"{name}: duplicated or lost text: {got!r}"
    if status == 200:
        assert failure is None
    elif before or name.startswith("stall before"):  # headers were committed (hold: 1 s)
        assert isinstance(failure, openai.APIError) and not isinstance(
            failure, openai.APIStatusError
        ), name
        FIGURES["error events"] += 1
    else:
        assert isinstance(failure, openai.APIStatusError), name
        assert (failure.status_code, failure.code) == (status, code), name
        FIGURES[f"status {status}"] += 1
    FIGURES["duplicated answers"] += 0
    # Every query got exactly one Poe request per client request: no hidden retries.
    assert len(fake_poe.requests_for(bot)) == 2


def test_proxy_keeps_serving_after_all_faults(
    faulty_proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, words(6))
    result = faulty_proxy.reverse_client(api_key=KEY).chat.completions.create(
        model=bot, messages=USER
    )
    assert result.choices[0].message.content == "".join(WORDS)
    assert_no_traceback(faulty_proxy.output)
    status = faulty_proxy.status()
    assert status["in_flight"] == 0 and status["awaiting_app"] == 0


def test_slow_drip_arrives_whole(faulty_proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    drip = [s for i in range(40) for s in (sleep(0.05), text(f"d{i} "))]
    fake_poe.script(bot, drip)
    got, failure = stream_text(faulty_proxy.reverse_client(api_key=KEY), bot)
    assert failure is None and got == "".join(f"d{i} " for i in range(40))
    FIGURES["slow drips"] += 1
