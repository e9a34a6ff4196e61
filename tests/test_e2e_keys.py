"""The Poe key pool, timeouts and keep-alives, the open-relay guard and the body limit, through a
real mitmdump (each test gets its own, since key state lives in the process)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, error, http_error, sleep, text
from harness import Mitmdump

from addon.config import fingerprint

# The timeouts run against FakePoe and fastapi-poe's own bot server (which pings meanwhile).
BOTH_STAND_INS = pytest.mark.both_stand_ins
HTTP_ERROR_ONLY_IN_FAKE_POE = pytest.mark.fake_poe_only(
    reason="http_error(): fastapi-poe's bot server always answers with an event stream"
)

USER = [{"role": "user", "content": "hi"}]
SECOND = "poe-second-key"


def keyed(fake: FakePoe, keys: str, **extra: str) -> Mitmdump:
    return Mitmdump(options=poe_options(fake, poe_api_key=keys, **extra), regular=False)


@pytest.mark.parametrize(
    ("failure", "why", "rested"),
    [
        pytest.param(
            http_error(429, {"detail": "slow down"}, {"Retry-After": "30"}),
            "rate-limited",
            True,
            marks=HTTP_ERROR_ONLY_IN_FAKE_POE,
        ),
        pytest.param(
            http_error(402, {"detail": "no points"}),
            "out of points",
            True,
            marks=HTTP_ERROR_ONLY_IN_FAKE_POE,
        ),
        pytest.param(
            http_error(401, {"detail": "bad key"}),
            "rejected",
            True,
            marks=HTTP_ERROR_ONLY_IN_FAKE_POE,
        ),
        # In-band, these may concern one bot only: fail over, but do not bench the key.
        (error("out of points", error_type="insufficient_fund"), "insufficient_quota", False),
        (error("You have exceeded rate limit for this bot."), "rate_limit_exceeded", False),
    ],
)
def test_failover_to_the_next_key(
    fake_poe: FakePoe, bot: str, failure: object, why: str, rested: bool
) -> None:
    # The first request (first key) fails in a way that may be the key's fault; the proxy
    # moves to the next key before anything reached the client, and (for the key's own
    # limits) keeps away from the bad key after.
    fake_poe.script_sequence(bot, [[failure], [text("from the second key")]])  # type: ignore[list-item]
    with keyed(fake_poe, f"{POE_KEY},{SECOND}") as m:
        client = m.reverse_client()
        result = client.chat.completions.create(model=bot, messages=USER)
        assert result.choices[0].message.content == "from the second key"
        client.chat.completions.create(model=bot, messages=USER)
        output = m.output
    keys = [r.api_key for r in fake_poe.requests_for(bot)]
    assert keys == [POE_KEY, SECOND, SECOND if rested else POE_KEY]
    assert why in output and fingerprint(POE_KEY) in output
    assert POE_KEY not in output and SECOND not in output  # fingerprints only


def test_every_key_out_is_insufficient_quota(fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [http_error(402, {"detail": "no points"})])
    with keyed(fake_poe, f"{POE_KEY},{SECOND}") as m:
        with pytest.raises(openai.RateLimitError) as info:
            m.reverse_client().chat.completions.create(model=bot, messages=USER)
        assert info.value.code == "insufficient_quota"
        assert info.value.response.headers["x-should-retry"] == "false"
        # Later requests are answered at once, without spending anything at Poe.
        with pytest.raises(openai.RateLimitError):
            m.reverse_client().chat.completions.create(model=bot, messages=USER)
    assert len(fake_poe.requests_for(bot)) == 2


def test_rate_limited_single_key_rests_for_retry_after(fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script_sequence(
        bot, [[http_error(429, {"detail": "slow"}, {"Retry-After": "2"})], [text("ok")]]
    )
    with keyed(fake_poe, POE_KEY) as m:
        client = m.reverse_client()
        with pytest.raises(openai.RateLimitError) as first:
            client.chat.completions.create(model=bot, messages=USER)
        assert first.value.response.headers["retry-after"] == "2"
        with pytest.raises(openai.RateLimitError) as resting:  # not sent to Poe at all
            client.chat.completions.create(model=bot, messages=USER)
        assert int(resting.value.response.headers["retry-after"]) in (1, 2)
        assert len(fake_poe.requests_for(bot)) == 1
        time.sleep(2.2)
        assert client.chat.completions.create(model=bot, messages=USER).choices[0].message.content


def test_key_file(fake_poe: FakePoe, bot: str, tmp_path: Path) -> None:
    fake_poe.script(bot, [text("ok")])
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# my keys\n{SECOND}\n\n")
    opts = poe_options(fake_poe, poe_api_key_file=str(keys))
    with Mitmdump(options=opts, regular=False) as m:
        m.reverse_client().chat.completions.create(model=bot, messages=USER)
        assert SECOND not in " ".join(m.command())
    assert fake_poe.requests_for(bot)[0].api_key == SECOND


# --- timeouts and keep-alives ------------------------------------------------------------------

TIMEOUTS = {
    "poe_first_event_timeout_s": "3",
    "poe_idle_timeout_s": "2",
    "poe_total_timeout_s": "5",
    "poe_header_hold_s": "1",
    "poe_keepalive_s": "1",
}


@pytest.fixture(scope="module")
def slow_proxy(fake_poe: FakePoe) -> Mitmdump:
    with Mitmdump(options=poe_options(fake_poe, **TIMEOUTS), regular=False) as m:
        yield m  # type: ignore[misc]


def client_for(m: Mitmdump) -> openai.OpenAI:
    return m.reverse_client(api_key=POE_KEY)


@BOTH_STAND_INS
def test_first_event_timeout_before_headers_is_504(
    slow_proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [sleep(4), text("too late")])
    with pytest.raises(openai.APIStatusError) as info:
        client_for(slow_proxy).chat.completions.create(model=bot, messages=USER)
    assert info.value.status_code == 504 and info.value.code == "timeout"
    assert fake_poe.wait_for(lambda: fake_poe.requests_for(bot)[0].disconnected is not None)


@BOTH_STAND_INS
def test_header_hold_then_keepalives_then_answer(
    slow_proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    # Poe stays silent 2.6 s (under the 3 s first-event timeout): the status line goes out
    # after the 1 s hold, keep-alive comments keep the connection busy, then the answer.
    fake_poe.script(bot, [sleep(2.6), text("worth the wait")])
    started = time.monotonic()
    with (
        httpx.Client(trust_env=False, timeout=10) as http,
        http.stream(
            "POST",
            f"{slow_proxy.reverse_url}/chat/completions",
            json={"model": bot, "messages": USER, "stream": True},
            headers={"authorization": f"Bearer {POE_KEY}"},
        ) as r,
    ):
        headers_after = time.monotonic() - started
        body = r.read().decode()
    assert r.status_code == 200
    assert 0.8 < headers_after < 1.7
    assert ": keep-alive" in body
    assert '"content":"worth the wait"' in body and body.endswith("data: [DONE]\n\n")


@BOTH_STAND_INS
def test_idle_timeout_after_streaming_began_is_an_error_event(
    slow_proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("partial"), sleep(3), text("never")])
    stream = client_for(slow_proxy).chat.completions.create(model=bot, messages=USER, stream=True)
    got = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    assert got == ["partial"] and "idle" in info.value.message


@BOTH_STAND_INS
def test_status_replacements_count_as_activity(
    slow_proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    from fake_poe import replace

    # 3 s in all, but never 2 s without an event: no idle timeout.
    steps = [replace("Thinking...")]
    for i in range(3):
        steps += [sleep(1.0), replace(f"Thinking... ({i + 1}s)")]
    fake_poe.script(bot, [*steps, replace(""), text("done")])
    result = client_for(slow_proxy).chat.completions.create(model=bot, messages=USER)
    assert result.choices[0].message.content == "done"


@BOTH_STAND_INS
def test_total_cap_is_504_not_to_be_retried(
    slow_proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("a"), *[s for _ in range(8) for s in (sleep(1), text("."))]])
    with pytest.raises(openai.APIStatusError) as info:
        client_for(slow_proxy).chat.completions.create(model=bot, messages=USER)
    assert info.value.status_code == 504
    assert info.value.response.headers["x-should-retry"] == "false"


# --- the open-relay guard and the body limit ----------------------------------------------------


def test_open_relay_refuses_to_start(fake_poe: FakePoe) -> None:
    m = Mitmdump(
        options=poe_options(fake_poe, poe_api_key=POE_KEY),
        reverse=False,
        regular=False,
        extra_args=["--mode", "regular@0.0.0.0:0"],
    )
    with pytest.raises(RuntimeError):
        m.start()
    assert "open relay" in m.output and "poe_allow_open_relay" in m.output
    # pass-through (no configured key) on the same listener is fine
    m = Mitmdump(
        options=poe_options(fake_poe),
        reverse=False,
        regular=False,
        extra_args=["--mode", "regular@0.0.0.0:0"],
    )
    m.wanted_listeners = 1
    with m:
        assert "listening at" in m.output


def test_body_limit_is_413(fake_poe: FakePoe, bot: str) -> None:
    with keyed(fake_poe, POE_KEY, poe_max_body_mb="1") as m, m.http() as http:
        big = {"model": bot, "messages": [{"role": "user", "content": "x" * (1024 * 1024)}]}
        r = http.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        fake_poe.script(bot, [text("small is fine")])
        r = http.post("/v1/chat/completions", json={"model": bot, "messages": USER})
        assert r.status_code == 200
