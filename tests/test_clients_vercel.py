"""The Vercel AI SDK (``ai`` + ``@ai-sdk/openai``, run by ``node tests/clients/vercel.mjs``)
against a real mitmdump: ``openai(model)`` (Responses) and ``openai.chat(model)``, in reverse
mode (baseURL) and in explicit-proxy mode (HTTPS_PROXY through undici's EnvHttpProxyAgent,
NODE_EXTRA_CA_CERTS = mitmproxy's CA, baseURL left at https://api.openai.com/v1)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from clients.node import run_node
from clients.timing import PACE_S, assert_arrived_as_sent
from fake_poe import FakePoe, Step, error, json_event, sleep, text
from harness import Mitmdump


def call(city: str) -> list[Step]:
    first = {
        "index": 0,
        "id": f"call_{city}",
        "type": "function",
        "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'},
    }
    return [json_event({"choices": [{"index": 0, "delta": {"tool_calls": [first]}}]})]


SCRIPTS: dict[str, list[list[Step]]] = {
    "plain": [[text("Hello"), text(" from Poe.")]],
    "stream": [[text("One"), sleep(PACE_S), text(" two"), sleep(PACE_S), text(" three")]],
    "tools": [call("Rome"), [text("It is sunny in Rome.")]],
    "stream_tools": [call("Oslo"), [text("Snow in Oslo.")]],
    "two_turns": [[text("Hi Ann.")], [text("Your name is Ann.")]],
    "stream_error": [[text("partial"), sleep(0.1), error("Something broke")]],
    "error": [[error("You have run out of points.", error_type="insufficient_fund")]],
}
CASES = [(m, a) for m in ("reverse", "explicit-proxy") for a in ("responses", "chat")]


class Run:
    def __init__(self, result: dict[str, Any], bots: dict[str, str], api: str) -> None:
        self.result, self.bots, self.api = result, bots, api


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def run(request: pytest.FixtureRequest, proxy: Mitmdump, fake_poe: FakePoe) -> Run:
    """One node process per mode and API doing every scenario (node's start-up is ~0.5 s)."""
    mode, api = request.param
    bots = {name: f"Vercel-{name}-{uuid.uuid4().hex[:8]}" for name in SCRIPTS}
    for name, scripts in SCRIPTS.items():
        fake_poe.script_sequence(bots[name], scripts)
    config: dict[str, Any] = {"api": api, "bots": bots}
    env: dict[str, str] = {}
    if mode == "reverse":
        config |= {"baseURL": proxy.reverse_url, "envProxy": False}
    else:
        config |= {"baseURL": None, "envProxy": True}
        env = {"HTTPS_PROXY": proxy.proxy_url, "NODE_EXTRA_CA_CERTS": str(proxy.ca_file)}
    return Run(run_node("vercel.mjs", config, env), bots, api)


def poe_query(fake: FakePoe, bot: str, n: int = 0) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in fake.requests_for(bot)[n].body["query"]]


def test_plain_answer(run: Run, fake_poe: FakePoe) -> None:
    got = run.result["plain"]
    assert got["text"] == "Hello from Poe." and got["finishReason"] == "stop"
    assert got["usage"]["outputTokens"] > 0
    assert poe_query(fake_poe, run.bots["plain"]) == [
        ("system", "Be brief."),
        ("user", "Say hello"),
    ]


def test_stream_arrives_in_pieces_over_time(run: Run) -> None:
    got = run.result["stream"]
    assert [d for _, d in got["deltas"]] == ["One", " two", " three"]
    assert_arrived_as_sent([t for t, _ in got["deltas"]])
    assert got["text"] == "One two three" and got["finishReason"] == "stop"


@pytest.mark.parametrize(
    ("name", "city", "result"),
    [("tools", "Rome", "sunny, 24C in Rome"), ("stream_tools", "Oslo", "snow in Oslo")],
)
def test_tool_round_trip_with_execute(
    run: Run, fake_poe: FakePoe, name: str, city: str, result: str
) -> None:
    got = run.result[name]
    assert got["calls"] == [city] and got["steps"] == 2
    assert got["text"] in ("It is sunny in Rome.", "Snow in Oslo.")
    first, second = fake_poe.requests_for(run.bots[name])
    assert first.body["tools"][0]["function"]["name"] == "get_weather"
    assert second.body["tool_calls"][0]["id"] == f"call_{city}"
    assert second.body["tool_results"][0]["content"] == result


def test_two_turn_chat(run: Run, fake_poe: FakePoe) -> None:
    got = run.result["two_turns"]
    assert (got["first"], got["second"]) == ("Hi Ann.", "Your name is Ann.")
    assert poe_query(fake_poe, run.bots["two_turns"], 1) == [
        ("user", "I am Ann."),
        ("bot", "Hi Ann."),
        ("user", "What is my name?"),
    ]
    if run.api == "responses":
        # what issue 15 is about: the SDK refers to its earlier output by id
        second_input = got["sent"][1]["input"]
        assert {"type": "item_reference", "id": second_input[1]["id"]} == second_input[1]


def test_error_is_the_sdks_api_call_error(run: Run, fake_poe: FakePoe) -> None:
    got = run.result["error"]
    assert got["isAPICallError"] is True, got
    assert got["statusCode"] == 429 and "out of points" in got["message"]
    assert len(fake_poe.requests_for(run.bots["error"])) == 1


def test_failure_after_the_stream_began_reaches_on_error(run: Run) -> None:
    got = run.result["stream_error"]
    assert got["errors"] == ["Poe bot error: Something broke"]
    assert got["parts"].index("text-delta:partial") < got["parts"].index("error")
    assert got["text"] == "partial"  # what Poe had sent is kept
