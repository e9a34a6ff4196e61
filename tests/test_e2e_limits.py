"""Legacy completions, output limits, n, stop, JSON mode, usage, and endpoints Poe lacks."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from fake_poe import FakePoe, sleep, text
from harness import Mitmdump
from openapi_schema import validate

from addon.tokens import TokenCounter

pytestmark = [
    pytest.mark.both_stand_ins,  # FakePoe and fastapi-poe's own bot server
    pytest.mark.both_transports,  # answers given in-process and over the loopback hop
]

USER = [{"role": "user", "content": "Tell me a long story"}]
WORDS = [f" word{i}" for i in range(60)]


def slow_story(n: int = 60) -> list[Any]:
    """A long answer that keeps coming: a proxy that stops reading leaves it unfinished."""
    return [text("Once upon a time")] + [s for w in WORDS[:n] for s in (sleep(0.03), text(w))]


def answer_of(stream: Any) -> tuple[str, list[str | None]]:
    got, finishes = "", []
    for chunk in stream:
        for choice in chunk.choices:
            got += getattr(choice.delta, "content", None) or ""
            finishes.append(choice.finish_reason)
    return got, [f for f in finishes if f]


def assert_poe_query_dropped(fake: FakePoe, bot: str) -> None:
    assert fake.wait_for(lambda: fake.requests_for(bot)[-1].disconnected is not None, 5)
    assert fake.requests_for(bot)[-1].finished is None


# --- max_tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("stream", [False, True])
def test_token_limit_ends_the_answer_and_drops_the_poe_query(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, field: str, stream: bool
) -> None:
    fake_poe.script(bot, slow_story())
    client = proxy.reverse_client()
    kwargs: dict[str, Any] = {field: 10}
    if stream:
        got, finishes = answer_of(
            client.chat.completions.create(model=bot, messages=USER, stream=True, **kwargs)
        )
    else:
        result = client.chat.completions.create(model=bot, messages=USER, **kwargs)
        got, finishes = result.choices[0].message.content or "", [result.choices[0].finish_reason]
        assert result.usage is not None and result.usage.completion_tokens == 10
    assert finishes == ["length"]
    assert TokenCounter(bot).count(got) == 10
    assert got.startswith("Once upon a time word0")
    assert_poe_query_dropped(fake_poe, bot)


# --- stop ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_stop_is_enforced_even_when_the_bot_ignores_it(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    fake_poe.script(
        bot, [text("Answer: 42."), text(" ##"), text("#"), text(" And then"), *slow_story(30)]
    )
    client = proxy.reverse_client()
    if stream:
        got, finishes = answer_of(
            client.chat.completions.create(model=bot, messages=USER, stream=True, stop=["###"])
        )
    else:
        result = client.chat.completions.create(model=bot, messages=USER, stop="###")
        got, finishes = result.choices[0].message.content or "", [result.choices[0].finish_reason]
    assert got == "Answer: 42. "
    assert finishes == ["stop"]
    assert fake_poe.requests_for(bot)[0].body["stop_sequences"] == ["###"]
    assert_poe_query_dropped(fake_poe, bot)


# --- n -------------------------------------------------------------------------------------------


def test_n_choices_non_streamed(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("one answer")])
    result = proxy.reverse_client().chat.completions.create(model=bot, messages=USER, n=3)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert all(c.message.content == "one answer" for c in result.choices)
    assert len(fake_poe.requests_for(bot)) == 3
    validate(result.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")


def test_n_choices_streamed_interleave_by_index(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("a"), sleep(0.2), text("b"), sleep(0.2), text("c")])
    stream = proxy.reverse_client().chat.completions.create(
        model=bot, messages=USER, n=2, stream=True
    )
    order: list[tuple[int, str]] = []
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                order.append((choice.index, choice.delta.content))
                texts[choice.index] += choice.delta.content
    assert texts == {0: "abc", 1: "abc"}
    # Both choices' "a" arrive before either's "c": interleaved, not one after the other.
    last_a = max(i for i, (_, t) in enumerate(order) if t == "a")
    first_c = min(i for i, (_, t) in enumerate(order) if t == "c")
    assert last_a < first_c


@pytest.mark.fake_poe_only(
    reason="http_error(): fastapi-poe's bot server always answers with an event stream"
)
def test_n_with_one_failing_choice_fails_the_request(
    proxy_passthrough: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    from fake_poe import http_error

    fake_poe.script_sequence(bot, [[text("fine")], [http_error(429, {"detail": "slow"})]])
    client = proxy_passthrough.reverse_client(api_key="poe-second-key")
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=bot, messages=USER, n=2)


# --- JSON mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_mode(proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool) -> None:
    fake_poe.script(bot, [text('```json\n{"city": '), text('"Paris"}\n```')])
    client = proxy.reverse_client()
    kwargs: dict[str, Any] = {"response_format": {"type": "json_object"}}
    if stream:
        got, _ = answer_of(
            client.chat.completions.create(model=bot, messages=USER, stream=True, **kwargs)
        )
    else:
        got = client.chat.completions.create(model=bot, messages=USER, **kwargs)
        got = got.choices[0].message.content or ""
    assert json.loads(got) == {"city": "Paris"}
    system = fake_poe.requests_for(bot)[0].body["query"][0]
    assert system["role"] == "system" and "valid JSON" in system["content"]


def test_json_schema_mode_sends_the_schema(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text('{"n": 3}')])
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    result = proxy.reverse_client().chat.completions.create(
        model=bot,
        messages=USER,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    assert json.loads(result.choices[0].message.content or "") == {"n": 3}
    assert json.dumps(schema) in fake_poe.requests_for(bot)[0].body["query"][0]["content"]


def test_json_mode_with_prose_answer_is_a_clear_error(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("I'd rather not use JSON today.")])
    with pytest.raises(openai.APIStatusError) as info:
        proxy.reverse_client().chat.completions.create(
            model=bot, messages=USER, response_format={"type": "json_object"}
        )
    assert info.value.status_code == 502 and info.value.code == "invalid_json_output"


# --- usage ---------------------------------------------------------------------------------------


def test_usage_is_a_real_token_count_and_equal_streamed_or_not(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    answer = "The quick brown fox jumps over the lazy dog."
    fake_poe.script(bot, [text("The quick brown fox"), text(" jumps over the lazy dog.")])
    client = proxy.reverse_client()
    plain = client.chat.completions.create(model=bot, messages=USER).usage
    streamed = None
    for chunk in client.chat.completions.create(
        model=bot, messages=USER, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            streamed = chunk.usage
    assert plain is not None and streamed is not None
    assert plain.model_dump() == streamed.model_dump()
    counter = TokenCounter(bot)
    assert plain.completion_tokens == counter.count(answer)
    assert plain.prompt_tokens == counter.messages(["Tell me a long story"])


# --- legacy completions ------------------------------------------------------------------------


def test_legacy_completion(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("Paris.")])
    client = proxy.reverse_client()
    result = client.completions.create(model=bot, prompt="The capital of France is", max_tokens=5)
    assert result.object == "text_completion"
    assert result.choices[0].text == "Paris."
    assert result.choices[0].finish_reason == "stop"
    validate(result.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")
    query = fake_poe.requests_for(bot)[0].body["query"]
    assert [(m["role"], m["content"]) for m in query] == [("user", "The capital of France is")]


def test_legacy_completion_streamed_with_echo_and_usage(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("Par"), text("is.")])
    with proxy.http() as http:
        r = http.post(
            "/v1/completions",
            json={
                "model": bot,
                "prompt": "Capital: ",
                "stream": True,
                "echo": True,
                "max_tokens": 50,
                "stream_options": {"include_usage": True},
            },
        )
    events = r.text.split("\n\n")
    assert events[-2] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == "Capital: Paris."
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    # The spec has no schema for completion stream chunks; OpenAI's own carry finish_reason
    # null until the last one, which matches CreateCompletionResponse.
    last = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(last) == 1
    validate(last[0], "CreateCompletionResponse")


def test_legacy_completion_list_of_prompts_and_default_limit(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, slow_story(40))
    result = proxy.reverse_client().completions.create(model=bot, prompt=["One", "Two"])
    assert [c.index for c in result.choices] == [0, 1]
    # OpenAI's default for this endpoint: 16 tokens without max_tokens.
    assert all(c.finish_reason == "length" for c in result.choices)
    assert all(TokenCounter(bot).count(c.text) == 16 for c in result.choices)
    asked = sorted(r.body["query"][0]["content"] for r in fake_poe.requests_for(bot))
    assert asked == ["One", "Two"]


def test_legacy_completion_bad_input(proxy: Mitmdump, bot: str) -> None:
    client = proxy.reverse_client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=bot, prompt=[[1, 2, 3]])
    assert info.value.param == "prompt"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=bot, prompt="x", best_of=3)


# --- what Poe cannot do --------------------------------------------------------------------------


def test_endpoints_poe_lacks_are_clear_404s(proxy: Mitmdump) -> None:
    client = proxy.reverse_client()
    calls = {
        "embeddings": lambda: client.embeddings.create(model="text-embedding-3-small", input="x"),
        "audio": lambda: client.audio.speech.create(model="tts-1", voice="alloy", input="hi"),
        "Files API": lambda: client.files.list(),
        "Batch API": lambda: client.batches.list(),
        "fine-tuning": lambda: client.fine_tuning.jobs.list(),
        "moderations": lambda: client.moderations.create(input="x"),
        "vector stores": lambda: client.vector_stores.list(),
    }
    for needle, call in calls.items():
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert needle in info.value.message and "not available through Poe" in info.value.message
        validate(info.value.response.json(), "ErrorResponse")
