"""The Responses API end to end: SDK -> mitmdump -> stand-in Poe."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from fake_poe import FakePoe, error, json_event, sleep, text
from harness import Mitmdump
from openapi_schema import validate

pytestmark = [
    pytest.mark.both_stand_ins,  # FakePoe and fastapi-poe's own bot server
    pytest.mark.both_transports,  # answers given in-process and over the loopback hop
]

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "error": "ResponseErrorEvent",
}


def call_chunks(call_id: str, name: str, *args: str) -> list[Any]:
    first = {
        "index": 0,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    chunks = [json_event({"choices": [{"index": 0, "delta": {"tool_calls": [first]}}]})]
    for a in args:
        delta = {"tool_calls": [{"index": 0, "function": {"arguments": a}}]}
        chunks.append(json_event({"choices": [{"index": 0, "delta": delta}]}))
    return chunks


def raw_events(proxy: Mitmdump, body: dict[str, Any]) -> list[dict[str, Any]]:
    with proxy.http() as http:
        r = http.post("/v1/responses", json={**body, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in r.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        events.append(event)
    return events


def strip_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: strip_ids(v)
            for k, v in value.items()
            # ids and times differ; `parsed` is the stream helper's own addition
            if k not in ("id", "created_at", "completed_at", "item_id", "parsed")
        }
    if isinstance(value, list):
        return [strip_ids(v) for v in value]
    return value


def test_streamed_events_in_order_and_valid(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("Hello"), text(" there")])
    events = raw_events(proxy, {"model": bot, "input": "hi", "instructions": "be nice"})
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        validate(event, EVENT_SCHEMAS[event["type"]])
    final = events[-1]["response"]
    validate(final, "Response")
    assert final["output"][0]["content"][0]["text"] == "Hello there"
    assert final["instructions"] == "be nice"
    query = fake_poe.requests_for(bot)[0].body["query"]
    assert [(m["role"], m["content"]) for m in query] == [("system", "be nice"), ("user", "hi")]


def test_stream_helper_final_response_equals_non_streamed(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("Same"), sleep(0.05), text(" answer.")])
    client = proxy.reverse_client()
    plain = client.responses.create(model=bot, input="hi", max_output_tokens=100)
    with client.responses.stream(model=bot, input="hi", max_output_tokens=100) as stream:
        streamed = stream.get_final_response()
    assert plain.output_text == streamed.output_text == "Same answer."
    a = strip_ids(plain.model_dump(mode="json"))
    b = strip_ids(streamed.model_dump(mode="json"))
    assert a == b
    validate(
        client.responses.with_raw_response.create(model=bot, input="hi").http_response.json(),
        "Response",
    )


def test_three_turns_through_previous_response_id(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script_sequence(bot, [[text("Hi Ann.")], [text("Blue.")], [text("Ann likes blue.")]])
    client = proxy.reverse_client()
    first = client.responses.create(model=bot, input="I am Ann.", instructions="Be brief.")
    second = client.responses.create(
        model=bot, input="My favourite colour?", previous_response_id=first.id
    )
    with client.responses.stream(
        model=bot, input="Summarise.", previous_response_id=second.id
    ) as s:
        third = s.get_final_response()
    assert third.output_text == "Ann likes blue."
    last = fake_poe.requests_for(bot)[-1].body["query"]
    assert [(m["role"], m["content"]) for m in last] == [
        ("user", "I am Ann."),
        ("bot", "Hi Ann."),
        ("user", "My favourite colour?"),
        ("bot", "Blue."),
        ("user", "Summarise."),
    ]
    # instructions are not carried over to later turns, as in OpenAI's API
    first_query = fake_poe.requests_for(bot)[0].body["query"]
    assert first_query[0] == {**first_query[0], "role": "system", "content": "Be brief."}


@pytest.mark.parametrize("stream", [False, True])
def test_function_calling_round_trip(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    fake_poe.script_sequence(
        bot,
        [call_chunks("call_9", "get_weather", '{"city":', '"Rome"}'), [text("Sunny in Rome.")]],
    )
    client = proxy.reverse_client()
    if stream:
        with client.responses.stream(model=bot, input="Weather in Rome?", tools=[WEATHER]) as s:
            first = s.get_final_response()
    else:
        first = client.responses.create(model=bot, input="Weather in Rome?", tools=[WEATHER])
    [call] = [item for item in first.output if item.type == "function_call"]
    assert (call.call_id, call.name, json.loads(call.arguments)) == (
        "call_9",
        "get_weather",
        {"city": "Rome"},
    )
    final = client.responses.create(
        model=bot,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER],
    )
    assert final.output_text == "Sunny in Rome."
    second = fake_poe.requests_for(bot)[1].body
    assert [m["content"] for m in second["query"]] == ["Weather in Rome?"]
    assert second["tool_calls"][0]["id"] == "call_9"
    assert second["tool_results"] == [
        {"role": "tool", "tool_call_id": "call_9", "name": "get_weather", "content": "sunny"}
    ]


def test_function_call_events(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, call_chunks("call_1", "get_weather", '{"city":', '"Oslo"}'))
    events = raw_events(proxy, {"model": bot, "input": "Oslo?", "tools": [WEATHER]})
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    for event in events:
        validate(event, EVENT_SCHEMAS[event["type"]])
    assert events[5]["arguments"] == '{"city":"Oslo"}'


def test_failure_mid_stream(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("Partial"), error("Internal server error")])
    client = proxy.reverse_client()
    # The raw event stream: the text so far, an `error` event, then `response.failed`.
    seen = list(client.responses.create(model=bot, input="hi", stream=True))
    kinds = [e.type for e in seen]
    assert kinds[-2:] == ["error", "response.failed"]
    assert "response.output_text.delta" in kinds
    assert seen[-1].response.status == "failed"  # type: ignore[union-attr]
    assert "Internal server error" in seen[-1].response.error.message  # type: ignore[union-attr]
    # The stream helper has no completed response to give: it raises.
    with client.responses.stream(model=bot, input="hi") as s, pytest.raises(RuntimeError):
        s.get_final_response()
    events = raw_events(proxy, {"model": bot, "input": "hi"})
    for event in events:
        validate(event, EVENT_SCHEMAS[event["type"]])


def test_failure_before_streaming_is_an_http_error(proxy: Mitmdump, bot: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:  # unscripted bot: Poe says unknown
        proxy.reverse_client().responses.create(model=bot, input="hi", stream=True)
    assert info.value.code == "model_not_found"


def test_max_output_tokens_makes_it_incomplete(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text(f" word{i}") for i in range(50)])
    result = proxy.reverse_client().responses.create(model=bot, input="hi", max_output_tokens=5)
    assert result.status == "incomplete"
    assert result.incomplete_details is not None
    assert result.incomplete_details.reason == "max_output_tokens"
    assert result.usage is not None and result.usage.output_tokens == 5


def test_get_delete_and_unknown_ids(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("kept")])
    client = proxy.reverse_client()
    made = client.responses.create(model=bot, input="hi")
    assert client.responses.retrieve(made.id).output_text == "kept"
    client.responses.delete(made.id)
    for call in (
        lambda: client.responses.retrieve(made.id),
        lambda: client.responses.delete(made.id),
        lambda: client.responses.create(model=bot, input="x", previous_response_id=made.id),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        validate(info.value.response.json(), "ErrorResponse")


def test_images_and_items_as_input(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("A cat.")])
    proxy.reverse_client().responses.create(
        model=bot,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": f"https://img.test/{bot}.png"},
                ],
            }
        ],
    )
    [message] = fake_poe.requests_for(bot)[0].body["query"]
    assert message["content"] == "What is this?"
    assert len(message["attachments"]) == 1
