"""Function calling, pictures and files in, image bots out: SDK -> mitmdump -> stand-in Poe."""

from __future__ import annotations

import base64
import json
from typing import Any

import openai
import pytest
from fake_poe import FakePoe, file, json_event, sleep, text
from harness import Mitmdump
from openapi_schema import validate

pytestmark = [
    pytest.mark.both_stand_ins,  # FakePoe and fastapi-poe's own bot server
    pytest.mark.both_transports,  # answers given in-process and over the loopback hop
]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"$ref": "#/$defs/City"}},
            "required": ["city"],
            "$defs": {"City": {"type": "string", "description": "a city name"}},
        },
    },
}
USER = [{"role": "user", "content": "Weather and time in Paris?"}]
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def tool_chunk(index: int, args: str = "", call_id: str = "", name: str = "") -> Any:
    call: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if call_id:
        call["id"] = call_id
        call["type"] = "function"
    if name:
        call["function"]["name"] = name
    return json_event(
        {"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}
    )


def finish_chunk(reason: str = "tool_calls") -> Any:
    return json_event({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})


TWO_CALLS = [
    tool_chunk(0, "", "call_w", "get_weather"),
    tool_chunk(1, "", "call_t", "get_time"),
    tool_chunk(0, '{"city": '),
    tool_chunk(1, '{"city": "Pa'),
    tool_chunk(0, '"Paris"}'),
    tool_chunk(1, 'ris"}'),
    finish_chunk(),
]


def test_parallel_tool_calls_interleaved_merge_in_the_sdk_stream_helper(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, TWO_CALLS)
    client = proxy.reverse_client()
    with client.chat.completions.stream(model=bot, messages=USER, tools=[WEATHER, TIME]) as s:
        final = s.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("call_w", "get_weather", {"city": "Paris"}),
        ("call_t", "get_time", {"city": "Paris"}),
    ]
    # What Poe was offered: both tools, the $ref into $defs inlined (Poe drops $defs).
    seen = fake_poe.requests_for(bot)[0]
    tools = seen.body["tools"]
    assert [t["function"]["name"] for t in tools] == ["get_weather", "get_time"]
    assert tools[1]["function"]["parameters"]["properties"]["city"] == {
        "type": "string",
        "description": "a city name",
    }


def test_streamed_tool_call_deltas_follow_the_rules(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, TWO_CALLS)
    with proxy.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={"model": bot, "messages": USER, "tools": [WEATHER, TIME], "stream": True},
        )
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    seen_first: set[int] = set()
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
        for delta in chunk["choices"][0]["delta"].get("tool_calls", []):
            assert "function" in delta
            if delta["index"] not in seen_first:
                seen_first.add(delta["index"])
                assert delta["id"] and delta["type"] == "function" and delta["function"]["name"]
    assert seen_first == {0, 1}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finishes if f] == ["tool_calls"]


def test_non_streamed_tool_calls(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, TWO_CALLS)
    with proxy.http() as http:
        r = http.post(
            "/v1/chat/completions", json={"model": bot, "messages": USER, "tools": [WEATHER, TIME]}
        )
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    message = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert message["content"] is None
    assert [c["function"]["arguments"] for c in message["tool_calls"]] == [
        '{"city": "Paris"}',
        '{"city": "Paris"}',
    ]


def test_parallel_tool_calls_false_keeps_the_first(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, TWO_CALLS)
    result = proxy.reverse_client().chat.completions.create(
        model=bot, messages=USER, tools=[WEATHER, TIME], parallel_tool_calls=False
    )
    calls = result.choices[0].message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["get_weather"]


def test_tool_choice_none_and_named(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("ok")])
    client = proxy.reverse_client()
    client.chat.completions.create(model=bot, messages=USER, tools=[WEATHER], tool_choice="none")
    client.chat.completions.create(
        model=bot,
        messages=USER,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    none, named = fake_poe.requests_for(bot)
    assert none.body["tools"] is None
    assert [t["function"]["name"] for t in named.body["tools"]] == ["get_time"]


@pytest.mark.parametrize("stream", [False, True])
def test_agent_loop(proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool) -> None:
    fake_poe.script_sequence(
        bot,
        [
            [tool_chunk(0, "", "call_1", "get_weather"), tool_chunk(0, '{"city":"Oslo"}')],
            [text("It is 3°C in Oslo.")],
        ],
    )
    client = proxy.reverse_client()
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    if stream:
        with client.chat.completions.stream(model=bot, messages=messages, tools=[WEATHER]) as s:
            first = s.get_final_completion()
    else:
        first = client.chat.completions.create(model=bot, messages=messages, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    result = {"temp_c": 3} if json.loads(call.function.arguments)["city"] == "Oslo" else {}
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    final = client.chat.completions.create(model=bot, messages=messages, tools=[WEATHER])
    assert final.choices[0].message.content == "It is 3°C in Oslo."
    second = fake_poe.requests_for(bot)[1].body
    assert [m["content"] for m in second["query"]] == ["Weather in Oslo?"]
    assert second["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        }
    ]
    assert second["tool_results"] == [
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "name": "get_weather",
            "content": '{"temp_c": 3}',
        }
    ]


def test_three_earlier_tool_rounds_reach_poe_intact(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("Done.")])
    messages: list[Any] = [{"role": "user", "content": "Plan my trip"}]
    for n, city in enumerate(["Rome", "Oslo", "Lima"]):
        messages += [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_{n}",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": json.dumps({"city": city}),
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": f"call_{n}", "content": f"{city}: sunny"},
        ]
    # Rounds 1 and 2 stay in the history; round 3 is the latest and goes in the tool fields.
    proxy.reverse_client().chat.completions.create(model=bot, messages=messages, tools=[WEATHER])
    # A user turn after all three: every round stays in the history.
    messages.append({"role": "user", "content": "Thanks, summarise."})
    proxy.reverse_client().chat.completions.create(model=bot, messages=messages, tools=[WEATHER])
    latest, history = (r.body for r in fake_poe.requests_for(bot))

    def rounds_in(query: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
        found = []
        for bot_msg, tool_msg in zip(query[1::2], query[2::2], strict=False):
            if bot_msg["role"] != "bot":
                continue
            calls = json.loads(
                bot_msg["content"].split("<tool_calls>")[1].split("</tool_calls>")[0]
            )
            result = json.loads(tool_msg["content"])
            assert tool_msg["role"] == "tool"
            assert result["tool_call_id"] == calls[0]["id"]
            assert result["name"] == "get_weather"
            found.append((calls[0]["id"], calls[0]["function"]["arguments"], result["content"]))
        return found

    assert rounds_in(latest["query"]) == [
        ("call_0", '{"city": "Rome"}', "Rome: sunny"),
        ("call_1", '{"city": "Oslo"}', "Oslo: sunny"),
    ]
    assert latest["tool_calls"][0]["id"] == "call_2"
    assert latest["tool_results"][0]["content"] == "Lima: sunny"
    assert rounds_in(history["query"]) == [
        ("call_0", '{"city": "Rome"}', "Rome: sunny"),
        ("call_1", '{"city": "Oslo"}', "Oslo: sunny"),
        ("call_2", '{"city": "Lima"}', "Lima: sunny"),
    ]
    assert history["tool_calls"] is None and history["query"][-1]["content"] == (
        "Thanks, summarise."
    )


def test_langchain_bind_tools_returns_the_tool_call(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    fake_poe.script(
        bot, [tool_chunk(0, "", "call_lc", "get_weather"), tool_chunk(0, '{"city": "Kyiv"}')]
    )
    llm = ChatOpenAI(model=bot, api_key="x", base_url=proxy.reverse_url, max_retries=0)
    message = llm.bind_tools([get_weather]).invoke("Weather in Kyiv?")
    assert message.tool_calls == [
        {"name": "get_weather", "args": {"city": "Kyiv"}, "id": "call_lc", "type": "tool_call"}
    ]


# --- pictures and files in -------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_images_and_pdf_uploaded_once_across_three_turns(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    fake_poe.script(bot, [text("I see it.")])
    png = PNG + bot.encode()  # bytes no other test uploads (the proxy caches by content)
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    http_url = f"https://images.example.test/{bot}/cat.jpg"
    pdf = b"%PDF-1.4 " + bot.encode()
    pdf_part = {
        "type": "file",
        "file": {"filename": "report.pdf", "file_data": base64.b64encode(pdf).decode()},
    }
    messages: list[Any] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "image_url", "image_url": {"url": http_url}},
                pdf_part,
            ],
        }
    ]
    client = proxy.reverse_client()
    before = len(fake_poe.uploads)
    for turn in range(3):
        if stream:
            chunks = client.chat.completions.create(model=bot, messages=messages, stream=True)
            answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            answer = client.chat.completions.create(model=bot, messages=messages).choices[0]
            answer = answer.message.content or ""
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"And now? ({turn})"},
        ]
    uploads = fake_poe.uploads[before:]
    assert len(uploads) == 3, uploads  # once each, not once per turn
    assert {u.data for u in uploads if u.data} == {png, pdf}
    assert [u.download_url for u in uploads if u.download_url] == [http_url]
    assert {u.filename for u in uploads} == {"image.png", "report.pdf", "cat.jpg"}
    for request in fake_poe.requests_for(bot):
        first = request.body["query"][0]
        assert first["content"] == "What is in these?"
        assert len(first["attachments"]) == 3
        assert {a["url"] for a in first["attachments"]} == {u.attachment_url for u in uploads}


def test_too_large_file_is_413(proxy: Mitmdump, bot: str) -> None:
    big = base64.b64encode(b"\0" * (1024 * 1024 + 10)).decode()  # the proxy allows 1 MB here
    with pytest.raises(openai.APIStatusError) as info:
        proxy.reverse_client().chat.completions.create(
            model=bot,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + big}}
                    ],
                }
            ],
        )
    assert info.value.status_code == 413
    validate(info.value.response.json(), "ErrorResponse")


def test_bad_data_url_and_file_id_are_400(proxy: Mitmdump, bot: str) -> None:
    client = proxy.reverse_client()
    for part in (
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
        {"type": "image_url", "image_url": {"url": "ftp://x/y.png"}},
        {"type": "file", "file": {"file_id": "file-abc"}},
    ):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model=bot, messages=[{"role": "user", "content": [part]}]
            )


def test_bot_parameters_through_extra_body(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("ok")])
    proxy.reverse_client().chat.completions.create(
        model=bot,
        messages=[{"role": "user", "content": "first"}, {"role": "user", "content": "think"}],
        extra_body={"poe_parameters": {"thinking_budget": 4096, "web_search": True}},
    )
    query = fake_poe.requests_for(bot)[0].body["query"]
    assert query[-1]["parameters"] == {"thinking_budget": 4096, "web_search": True}
    assert query[0]["parameters"] == {}


# --- images out ------------------------------------------------------------------------------


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
def test_images_generate(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, response_format: str
) -> None:
    url = fake_poe.host_file(f"{bot}.png", PNG, "image/png")
    fake_poe.script(
        bot, [text("Generating image (50%)"), sleep(0.01), file(url, "image/png", "out.png")]
    )
    client = proxy.reverse_client()
    result = client.images.generate(
        model=bot,
        prompt="a cat",
        n=2,
        size="1792x1024",
        response_format=response_format,  # type: ignore[arg-type]
    )
    assert len(result.data) == 2
    if response_format == "url":
        assert [d.url for d in result.data] == [url, url]
    else:
        assert [base64.b64decode(d.b64_json or "") for d in result.data] == [PNG, PNG]
    validate(result.model_dump(mode="json", exclude_none=True), "ImagesResponse")
    requests = fake_poe.requests_for(bot)
    assert len(requests) == 2
    message = requests[0].body["query"][-1]
    assert message["content"] == "a cat"
    assert message["parameters"] == {"aspect_ratio": "16:9"}


def test_dall_e_3_maps_to_the_poe_bot(proxy: Mitmdump, fake_poe: FakePoe) -> None:
    fake_poe.script("DALL-E-3", [file("https://pfst.test/d.png", "image/png", "d.png")])
    result = proxy.reverse_client().images.generate(model="dall-e-3", prompt="a dog")
    assert result.data is not None and result.data[0].url == "https://pfst.test/d.png"


def test_image_bot_without_image_is_a_clear_error(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("I only write words.")])
    with pytest.raises(openai.APIStatusError) as info:
        proxy.reverse_client().images.generate(model=bot, prompt="a cat")
    assert info.value.status_code == 502 and "without an image" in info.value.message


def test_image_bot_in_chat_answers_with_markdown_image(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [file("https://pfst.test/c.png", "image/png", "c.png")])
    result = proxy.reverse_client().chat.completions.create(
        model=bot, messages=[{"role": "user", "content": "draw"}]
    )
    assert result.choices[0].message.content == "![c.png](https://pfst.test/c.png)"
