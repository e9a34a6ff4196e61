"""The Responses API's whole input union: item_reference from the response store, and every
other item type of the published spec either translated or refused with a 400 that names it."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, json_event, text
from harness import Mitmdump
from openapi_schema import spec_path

from addon.errors import OpenAIError
from addon.responses import REFUSED_ITEMS, ResponseStore, input_to_messages

TRANSLATED = {"message", "function_call", "function_call_output", "item_reference", "reasoning"}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def spec_item_types() -> set[str]:
    """Every ``type`` value of CreateResponse's input items (InputItem and its Item union)."""
    schemas = json.loads(spec_path().read_text())["components"]["schemas"]

    def consts(node: Any) -> list[str]:
        if not isinstance(node, dict):
            return []
        if "$ref" in node:
            return consts(schemas[node["$ref"].rsplit("/", 1)[1]])
        found = list(node.get("enum", [])) + ([node["const"]] if "const" in node else [])
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(key, []):
                found += consts(sub)
        return [f for f in found if isinstance(f, str)]

    def types_of(name: str) -> set[str]:
        schema = schemas[name]
        own = consts(schema.get("properties", {}).get("type"))
        for part in schema.get("allOf", []):
            if "$ref" in part:
                own += sorted(types_of(part["$ref"].rsplit("/", 1)[1]))
            own += consts(part.get("properties", {}).get("type"))
        return set(own)

    out: set[str] = set()
    for union in ("InputItem", "Item"):
        for ref in schemas[union]["oneOf"]:
            name = ref["$ref"].rsplit("/", 1)[1]
            if name != "Item":
                out |= types_of(name)
    return out


def refusal(value: object, lookup: Any = None) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        input_to_messages(value, lookup)
    return caught.value


# --- the whole union, unit level ------------------------------------------------------------------


def test_every_spec_item_type_is_decided() -> None:
    in_spec = spec_item_types()
    assert len(in_spec) > 25, in_spec  # the spec parsed: not an empty set passing vacuously
    assert in_spec <= TRANSLATED | set(REFUSED_ITEMS), in_spec - TRANSLATED - set(REFUSED_ITEMS)
    # and no decision for a type the spec does not have
    assert set(REFUSED_ITEMS) <= in_spec


@pytest.mark.parametrize("kind", sorted(REFUSED_ITEMS))
def test_each_refused_type_is_a_400_naming_it_and_its_index(kind: str) -> None:
    items = [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": kind, "id": "x_1", "call_id": "c"},
    ]
    err = refusal(items)
    assert (err.status, err.param, err.type) == (400, "input[2].type", "invalid_request_error")
    assert f"'{kind}'" in err.message and err.message.startswith("input[2]:")


def test_translated_types() -> None:
    items = [
        {"type": "message", "role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
        },
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {
            "type": "function_call_output",
            "call_id": "c1",
            "output": [
                {"type": "input_text", "text": "sunny"},
                {"type": "input_text", "text": "20C"},
            ],
        },
    ]
    assert input_to_messages(items) == [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny\n20C"},
    ]


def test_function_output_picture_is_refused_not_dropped() -> None:
    item = {
        "type": "function_call_output",
        "call_id": "c1",
        "output": [
            {"type": "input_text", "text": "see"},
            {"type": "input_image", "image_url": "https://example.com/a.png"},
        ],
    }
    err = refusal([{"role": "user", "content": "x"}, item])
    assert (err.status, err.param) == (400, "input[1].output[1].type")
    assert "'input_image'" in err.message


def test_item_reference_resolved_by_lookup_also_without_type() -> None:
    stored = {
        "id": "msg_a",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "Hi Ann.", "annotations": []}],
    }
    lookup = {"msg_a": stored}.get
    got = input_to_messages(
        [
            {"role": "user", "content": "I am Ann"},
            {"type": "item_reference", "id": "msg_a"},
            {"id": "msg_a"},  # the spec's type is optional (default item_reference)
        ],
        lookup,
    )
    assert (
        got[1] == got[2] == {"role": "assistant", "content": [{"type": "text", "text": "Hi Ann."}]}
    )


@pytest.mark.parametrize(
    ("item", "status", "param"),
    [
        ({"type": "item_reference", "id": "msg_gone"}, 404, "input[3]"),
        ({"type": "item_reference"}, 400, "input[3].id"),
        ({"type": "item_reference", "id": ""}, 400, "input[3].id"),
        ({"type": "item_reference", "id": 7}, 400, "input[3].id"),
    ],
)
def test_item_reference_errors_name_the_index(
    item: dict[str, Any], status: int, param: str
) -> None:
    items = [{"role": "user", "content": "a"}] * 3 + [item]
    err = refusal(items, {}.get)
    assert (err.status, err.param) == (status, param)
    if status == 404:
        assert err.code == "not_found" and "msg_gone" in err.message


def test_references_cost_what_their_items_would_inline() -> None:
    item = {"id": "msg_a", "type": "message", "role": "assistant", "content": "x" * 1000}
    size = len(json.dumps(item))
    refs = [{"role": "user", "content": "hi"}] + [{"type": "item_reference", "id": "msg_a"}] * 10
    assert len(input_to_messages(refs, {"msg_a": item}.get, 10 * size)) == 11  # at the limit
    err = refusal_with(refs, {"msg_a": item}.get, 10 * size - 1)  # one byte under it
    assert (err.status, err.code, err.param) == (413, "request_too_large", "input[10]")
    err = refusal_with(refs, {"msg_a": item}.get, 3 * size + 5)
    assert err.param == "input[4]"  # refused at the reference that crosses the limit


def refusal_with(value: object, lookup: Any, limit: int) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        input_to_messages(value, lookup, limit)
    return caught.value


def test_store_item_index_follows_eviction_delete_and_10000_puts() -> None:
    store = ResponseStore(max_entries=100)

    def response(n: int) -> dict[str, Any]:
        output = [{"id": f"msg_{n}", "type": "message"}, {"id": f"fc_{n}", "type": "function_call"}]
        return {"id": f"resp_{n}", "output": output}

    for n in range(10_000):
        store.put(response(n), [])
    assert len(store) == 100
    assert len(store._holders) == 200  # the index is bounded with the store
    assert store.item("msg_0") is None and store.item("fc_9899") is None
    assert store.item("fc_9999") == {"id": "fc_9999", "type": "function_call"}
    assert store.delete("resp_9999")
    assert store.item("msg_9999") is None and len(store._holders) == 198
    aged = ResponseStore(max_age_s=0)
    aged.put(response(1), [])
    assert aged.item("msg_1") is None and not aged._holders


# --- end to end: the SDK -> mitmdump -> stand-in Poe -------------------------------------------


def query_of(fake: FakePoe, bot: str, n: int) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in fake.requests_for(bot)[n].body["query"]]


@pytest.mark.parametrize("stream", [False, True])
def test_second_turn_with_item_reference_as_the_vercel_sdk_sends_it(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    fake_poe.script_sequence(bot, [[text("Hi Ann.")], [text("Blue.")]])
    client = proxy.reverse_client()
    if stream:
        with client.responses.stream(model=bot, input="I am Ann.") as s:
            first = s.get_final_response()
    else:
        first = client.responses.create(model=bot, input="I am Ann.")
    second = client.responses.create(
        model=bot,
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "I am Ann."}]},
            {"type": "item_reference", "id": first.output[0].id},
            {"role": "user", "content": [{"type": "input_text", "text": "My colour?"}]},
        ],
    )
    assert second.output_text == "Blue."
    assert query_of(fake_poe, bot, 1) == [
        ("user", "I am Ann."),
        ("bot", "Hi Ann."),
        ("user", "My colour?"),
    ]


def test_function_call_referenced_then_answered(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    first_call = {
        "index": 0,
        "id": "call_7",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
    }
    fake_poe.script_sequence(
        bot,
        [
            [json_event({"choices": [{"index": 0, "delta": {"tool_calls": [first_call]}}]})],
            [text("Sunny in Rome.")],
        ],
    )
    client = proxy.reverse_client()
    first = client.responses.create(model=bot, input="Rome?", tools=[WEATHER])  # type: ignore[list-item]
    [call] = first.output
    assert call.type == "function_call" and call.id.startswith("fc_")
    final = client.responses.create(
        model=bot,
        tools=[WEATHER],  # type: ignore[list-item]
        input=[
            {"role": "user", "content": "Rome?"},
            {"type": "item_reference", "id": call.id},
            {"type": "function_call_output", "call_id": "call_7", "output": "sunny"},
        ],
    )
    assert final.output_text == "Sunny in Rome."
    second = fake_poe.requests_for(bot)[1].body
    assert second["tool_calls"][0]["id"] == "call_7"
    assert second["tool_results"][0]["content"] == "sunny"


def test_unknown_reference_is_a_404_before_poe_is_asked(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("never")])
    client = proxy.reverse_client()
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(
            model=bot,
            input=[
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"type": "item_reference", "id": "msg_nope"},
            ],
        )
    body = caught.value.body
    assert isinstance(body, dict)
    assert (body["param"], body["code"], body["type"]) == (
        "input[3]",
        "not_found",
        "invalid_request_error",
    )
    assert fake_poe.requests_for(bot) == []


def test_refused_item_type_through_the_proxy(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    client = proxy.reverse_client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model=bot,
            input=[
                {"role": "user", "content": "a"},
                {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {}},
            ],  # type: ignore[list-item]
        )
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == "input[1].type"
    assert "'web_search_call'" in body["message"]
    assert fake_poe.requests_for(bot) == []


def test_expired_deleted_and_unstored_items_are_404(fake_poe: FakePoe, bot: str) -> None:
    opts = poe_options(fake_poe, poe_response_store_size="1")
    fake_poe.script_sequence(bot, [[text("one")], [text("two")], [text("three")]])
    with Mitmdump(options=opts, env={"POE_API_KEY": POE_KEY}, regular=False) as proxy:
        client = proxy.reverse_client()
        first = client.responses.create(model=bot, input="1")
        unstored = client.responses.create(model=bot, input="2", store=False)
        second = client.responses.create(model=bot, input="3")  # evicts `first`
        gone = [first.output[0].id, unstored.output[0].id]
        client.responses.delete(second.id)
        gone.append(second.output[0].id)
        for item_id in gone:
            with pytest.raises(openai.NotFoundError) as caught:
                client.responses.create(
                    model=bot,
                    input=[
                        {"role": "user", "content": "x"},
                        {"type": "item_reference", "id": item_id},
                    ],
                )
            assert isinstance(caught.value.body, dict)
            assert caught.value.body["param"] == "input[1]"
        assert len(fake_poe.requests_for(bot)) == 3


def test_a_small_body_cannot_repeat_a_long_answer_into_a_huge_query(
    fake_poe: FakePoe, bot: str
) -> None:
    opts = poe_options(fake_poe, poe_max_body_mb="1")
    fake_poe.script(bot, [text("y" * 200_000)])
    with Mitmdump(options=opts, env={"POE_API_KEY": POE_KEY}, regular=False) as proxy:
        client = proxy.reverse_client()
        long_answer = client.responses.create(model=bot, input="write a lot").output[0].id
        ref = {"type": "item_reference", "id": long_answer}  # ~200 KB each; at the limit: unit test
        asked = len(fake_poe.requests_for(bot))
        with pytest.raises(openai.APIStatusError) as caught:
            client.responses.create(model=bot, input=[{"role": "user", "content": "a"}] + [ref] * 6)
        assert caught.value.status_code == 413
        assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "input[6]"
        assert len(fake_poe.requests_for(bot)) == asked  # refused before Poe was asked
        assert client.responses.create(model=bot, input="still up?").status == "completed"
