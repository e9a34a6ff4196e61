"""The OpenAI Agents SDK (``openai-agents``) against a real mitmdump: its default Responses
model and its chat-completions model, in reverse mode (a base URL) and in explicit-proxy mode
(HTTPS_PROXY + SSL_CERT_FILE pointing at mitmproxy's CA, base URL left at api.openai.com).

Tracing is off, so nothing but the proxy is ever contacted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest
from clients.timing import PACE_S, assert_arrived_as_sent
from fake_poe import FakePoe, error, json_event, sleep, text
from harness import Mitmdump
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import ResponseTextDeltaEvent

try:
    import agents
    from agents import Agent, OpenAIProvider, RunConfig, Runner, function_tool
except ImportError as e:  # a clear failure, not a skip
    raise ImportError(
        "openai-agents is missing: install the test dependencies with ./run.sh test (or "
        "'.venv/bin/python -m pip install openai-agents')"
    ) from e

agents.set_tracing_disabled(True)

MODES = ["reverse", "explicit-proxy"]
APIS = ["responses", "chat_completions"]


@pytest.fixture(params=[(m, a) for m in MODES for a in APIS], ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


def client_for(
    proxy: Mitmdump, mode: str, monkeypatch: pytest.MonkeyPatch, retries: int = 0
) -> Any:
    """An AsyncOpenAI client as a user would configure it for each mode."""
    if mode == "reverse":
        return openai.AsyncOpenAI(
            api_key="client-key",
            base_url=proxy.reverse_url,
            max_retries=retries,
            http_client=httpx.AsyncClient(trust_env=False, timeout=30),
        )
    # Explicit proxy: only the environment tells the SDK's own httpx client where to go.
    for name in ("HTTP_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", proxy.proxy_url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_file))
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return openai.AsyncOpenAI(api_key="client-key", max_retries=retries)


def run_config(client: Any, api: str) -> RunConfig:
    provider = OpenAIProvider(openai_client=client, use_responses=api == "responses")
    return RunConfig(model_provider=provider, tracing_disabled=True)


Body = Callable[[RunConfig], Awaitable[Any]]


@pytest.fixture
def run(
    proxy: Mitmdump, setup: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> Callable[[Body], Any]:
    """Runs ``body(run_config)`` in one event loop with a fresh client for the mode and API."""
    mode, api = setup

    def go(body: Body, retries: int = 0) -> Any:
        async def main() -> Any:
            client = client_for(proxy, mode, monkeypatch, retries)
            try:
                return await body(run_config(client, api))
            finally:
                await client.close()

        return asyncio.run(main())

    return go


Run = Callable[..., Any]


def test_plain_answer(run: Run, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("Hello"), text(" from Poe.")])
    agent = Agent(name="a", instructions="Be brief.", model=bot)
    result = run(lambda config: Runner.run(agent, "Say hello", run_config=config))
    assert result.final_output == "Hello from Poe."
    query = fake_poe.requests_for(bot)[0].body["query"]
    assert [(m["role"], m["content"]) for m in query] == [
        ("system", "Be brief."),
        ("user", "Say hello"),
    ]


def test_stream_arrives_in_pieces_over_time(run: Run, fake_poe: FakePoe, bot: str) -> None:
    paced = [text("One"), sleep(PACE_S), text(" two"), sleep(PACE_S), text(" three")]
    fake_poe.script_sequence(bot, [[text("warm-up")], paced])
    agent = Agent(name="a", model=bot)

    async def stream(config: RunConfig) -> tuple[list[tuple[float, str]], Any]:
        # The SDK's first streamed run in a process spends ~0.5 s of the event loop on its own
        # set-up (lazy imports, pydantic models) while the first events wait in its queue.
        async for _ in Runner.run_streamed(agent, "Hi", run_config=config).stream_events():
            pass
        result = Runner.run_streamed(agent, "Count", run_config=config)
        deltas: list[tuple[float, str]] = []
        async for event in result.stream_events():
            data = getattr(event, "data", None)
            if event.type == "raw_response_event" and isinstance(
                data, ResponseTextDeltaEvent | ChatCompletionChunk
            ):
                # the chat-completions model re-emits chunks as Responses delta events
                deltas.append((time.monotonic(), data.delta))  # type: ignore[union-attr]
        return deltas, result

    deltas, result = run(stream)
    assert [d for _, d in deltas] == ["One", " two", " three"]
    assert_arrived_as_sent([t for t, _ in deltas])
    assert result.final_output == "One two three"


def test_tool_round_trip_with_the_sdks_own_loop(run: Run, fake_poe: FakePoe, bot: str) -> None:
    call = {
        "index": 0,
        "id": "call_w1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
    }
    fake_poe.script_sequence(
        bot,
        [
            [json_event({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})],
            [text("It is sunny in Rome.")],
        ],
    )
    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return f"sunny, 24C in {city}"

    agent = Agent(name="a", model=bot, tools=[get_weather])
    result = run(lambda config: Runner.run(agent, "Weather in Rome?", run_config=config))
    assert seen == ["Rome"]
    assert result.final_output == "It is sunny in Rome."
    first, second = fake_poe.requests_for(bot)
    assert first.body["tools"][0]["function"]["name"] == "get_weather"
    assert second.body["tool_calls"][0]["id"] == "call_w1"
    assert second.body["tool_results"][0]["content"] == "sunny, 24C in Rome"


def test_second_turn_from_to_input_list(run: Run, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script_sequence(bot, [[text("Hi Ann.")], [text("Your name is Ann.")]])
    agent = Agent(name="a", model=bot)

    async def two_turns(config: RunConfig) -> Any:
        first = await Runner.run(agent, "I am Ann.", run_config=config)
        turn2 = [*first.to_input_list(), {"role": "user", "content": "What is my name?"}]
        return await Runner.run(agent, turn2, run_config=config)  # type: ignore[arg-type]

    assert run(two_turns).final_output == "Your name is Ann."
    query = fake_poe.requests_for(bot)[1].body["query"]
    assert [(m["role"], m["content"]) for m in query] == [
        ("user", "I am Ann."),
        ("bot", "Hi Ann."),
        ("user", "What is my name?"),
    ]


def test_out_of_points_is_the_sdks_rate_limit_error_and_not_retried(
    run: Run, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [error("You have run out of points.", error_type="insufficient_fund")])
    agent = Agent(name="a", model=bot)
    with pytest.raises(openai.RateLimitError) as caught:
        # retries=2 is the SDK's default: x-should-retry: false must keep it from paying again
        run(lambda config: Runner.run(agent, "hi", run_config=config), retries=2)
    assert caught.value.status_code == 429
    assert caught.value.code == "insufficient_quota"
    assert len(fake_poe.requests_for(bot)) == 1
