"""JSON mode finds the JSON value in the answer by parsing it (issue 15, item 3).

The bot is only asked for JSON (Poe has no JSON mode), so its answer may wrap the value in
prose, code fences or other JSON: the proxy hands the client the first value that fits, i.e.
that validates against the client's schema (json_schema) or is an object (json_object).
"""

from __future__ import annotations

import time
from typing import Any

import openai
import pydantic
import pytest
from fake_poe import FakePoe, text
from harness import Mitmdump

from addon import chat
from addon.limits import MAX_JSON_TRIES, clean_json
from addon.mappings import ModelMap

pytestmark = pytest.mark.both_stand_ins  # FakePoe and fastapi-poe's own bot server

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
USER = [{"role": "user", "content": "Where is the Louvre?"}]


class City(pydantic.BaseModel):
    city: str
    population: int


# --- clean_json ----------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [None, CITY], ids=["json_object", "json_schema"])
@pytest.mark.parametrize(
    ("answer", "value"),
    [
        ('{"city": "Paris"}', '{"city": "Paris"}'),
        ('  \n{"city": "Paris"}\n', '{"city": "Paris"}'),
        ('Sure [1]: {"city": "Paris"}', '{"city": "Paris"}'),
        ('Sure [1]: {"city": "Paris"} (see [2])', '{"city": "Paris"}'),
        ('```json\n{"city": "Paris"}\n```', '{"city": "Paris"}'),
        ('Here you go:\n```json\n{"city": "Paris"}\n```\nAnything else? {x}', '{"city": "Paris"}'),
        ('{"city": "Pa}ri[s"} and more {', '{"city": "Pa}ri[s"}'),
        ('Note {see below}: {"city": "Paris"} {"city": "Rome"}', '{"city": "Paris"}'),
        ('Quote: {"city": "a \\"}{\\" b"} ok', '{"city": "a \\"}{\\" b"}'),
        ("no JSON here [1] {at all}", None),
        ('{"city": "Paris"', None),
        ("", None),
        ("[" * 5000, None),
    ],
)
def test_the_first_fitting_value_is_found(
    answer: str, value: str | None, schema: dict[str, Any] | None
) -> None:
    assert clean_json(answer, schema) == value


def test_a_value_that_fails_the_schema_is_skipped_for_one_that_passes() -> None:
    answer = 'First try: {"city": 42}. Corrected: {"city": "Paris"}'
    assert clean_json(answer, CITY) == '{"city": "Paris"}'
    assert clean_json(answer) == '{"city": 42}'  # json_object: any object will do


def test_a_wrapper_that_fails_the_schema_is_not_searched_inside() -> None:
    # The value inside another value is part of that value, not the answer.
    assert clean_json('[{"city": "Paris"}]', CITY) is None
    assert clean_json('{"answer": {"city": "Paris"}} {"city": "Rome"}', CITY) == (
        '{"city": "Rome"}'
    )


def test_arrays_fit_a_schema_that_asks_for_one() -> None:
    schema = {"type": "array", "items": {"type": "integer"}}
    assert clean_json('Sure ["a"]: [1, 2, 3]', schema) == "[1, 2, 3]"
    assert clean_json('Sure ["a"]: [1, 2, 3]') is None  # json_object wants an object


def test_a_whole_answer_that_is_json_stays_as_written_without_a_schema() -> None:
    assert clean_json("[1, 2]") == "[1, 2]"
    assert clean_json("  42 ") == "42"


def test_nothing_to_validate_against_is_no_veto() -> None:
    remote = {"$ref": "https://example.invalid/schema.json"}
    assert clean_json('x {"a": 1}', remote) == '{"a": 1}'


def test_a_schema_that_refers_to_itself_is_no_veto() -> None:
    looping = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    assert clean_json('Sure [1]: {"a": 1}', looping) == "[1]"  # could not be checked: first value


def test_an_empty_schema_asks_for_an_object_as_json_object_does() -> None:
    def schema_of(json_schema: dict[str, Any]) -> dict[str, Any] | None:
        body = {
            "model": "gpt-4o",
            "messages": USER,
            "response_format": {"type": "json_schema", "json_schema": json_schema},
        }
        return chat.parse_chat_request(body, ModelMap({"gpt-4o": "GPT-4o"})).json_schema

    assert schema_of({"name": "any"}) is None and schema_of({"name": "e", "schema": {}}) is None
    assert schema_of({"name": "c", "schema": CITY}) == CITY


def test_brackets_cannot_hold_the_event_loop() -> None:
    for answer in ("[" * 200_000, '{"a":' * 50_000, "[1]" * 100_000 + '{"city": "a"}'):
        started = time.perf_counter()
        assert clean_json(answer, CITY) is None
        assert time.perf_counter() - started < 2
    assert clean_json("[1]" * (MAX_JSON_TRIES - 1) + '{"city": "a"}', CITY) == '{"city": "a"}'


# --- end to end, through the SDK ----------------------------------------------------------------


def test_sdk_parse_with_a_pydantic_model_through_prose_with_brackets(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(
        bot,
        [
            text("Sure [1]: here is "),
            text('{"note": "not it"} and then\n```json\n{"city": "Paris", '),
            text('"population": 2102650}\n```\n[1] INSEE'),
        ],
    )
    result = proxy.reverse_client().chat.completions.parse(
        model=bot, messages=USER, response_format=City
    )
    assert result.choices[0].message.parsed == City(city="Paris", population=2102650)
    sent = fake_poe.requests_for(bot)[0].body["query"][0]["content"]
    assert '"population"' in sent  # the model's schema went to the bot


def test_sdk_stream_with_a_pydantic_model(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text('Done [ok]: {"city": "Lyon", "population": 522250}')])
    client = proxy.reverse_client()
    with client.chat.completions.stream(model=bot, messages=USER, response_format=City) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.parsed == City(city="Lyon", population=522250)


def test_responses_parse_with_a_pydantic_model(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text('Wrong: {"city": 1}. Right: {"city": "Nice", "population": 1}')])
    result = proxy.reverse_client().responses.parse(model=bot, input="Where?", text_format=City)
    assert result.output_parsed == City(city="Nice", population=1)


def test_a_schema_that_is_no_schema_is_refused_before_poe_is_asked(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text('{"city": "Paris"}')])
    bad_formats: list[dict[str, Any]] = [
        {"name": "c", "schema": {"type": "town"}},
        {"name": "c", "schema": ["not", "an", "object"]},
    ]
    for json_schema in bad_formats:
        with pytest.raises(openai.BadRequestError) as info:
            proxy.reverse_client().chat.completions.create(
                model=bot,
                messages=USER,
                response_format={"type": "json_schema", "json_schema": json_schema},  # type: ignore[typeddict-item]
            )
        body: Any = info.value.body
        assert info.value.body and body["param"] == "response_format"
        assert "response_format.json_schema.schema" in body["message"]
    assert fake_poe.requests_for(bot) == []


def test_an_answer_without_a_fitting_value_is_a_clear_error(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text('Sure: {"city": 42}')])
    with pytest.raises(openai.APIStatusError) as info:
        proxy.reverse_client().chat.completions.create(
            model=bot,
            messages=USER,
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}},
        )
    assert info.value.status_code == 502 and info.value.code == "invalid_json_output"
