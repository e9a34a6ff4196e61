"""Pure pieces of function calling, file inputs and image generation."""

from __future__ import annotations

import base64

import pytest

from addon.errors import OpenAIError
from addon.files import file_part, from_data_url, image_part
from addon.images import aspect_for, image_urls, parse_image_request
from addon.mappings import ModelMap
from addon.tools import ToolCallAssembler, parse_tools


def chunk(*calls: dict[str, object], content: str | None = None) -> dict[str, object]:
    delta: dict[str, object] = {"tool_calls": list(calls)}
    if content is not None:
        delta["content"] = content
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def test_assembler_dense_indexes_and_generated_ids() -> None:
    a = ToolCallAssembler()
    # Poe uses index 3 and 7, no id on the first: the client sees 0 and 1 with ids.
    _, d1 = a.feed(chunk({"index": 3, "function": {"name": "f", "arguments": "{"}}))
    _, d2 = a.feed(chunk({"index": 7, "id": "x", "function": {"name": "g", "arguments": ""}}))
    _, d3 = a.feed(chunk({"index": 3, "function": {"arguments": "}"}}))
    assert d1[0]["index"] == 0 and d1[0]["id"].startswith("call_") and d1[0]["type"] == "function"
    assert d2 == [
        {"index": 1, "id": "x", "type": "function", "function": {"name": "g", "arguments": ""}}
    ]
    assert d3 == [{"index": 0, "function": {"arguments": "}"}}]
    assert [c["function"]["arguments"] for c in a.merged()] == ["{}", ""]


def test_assembler_waits_for_the_name() -> None:
    a = ToolCallAssembler()
    assert a.feed(chunk({"index": 0, "id": "c", "function": {"arguments": '{"a"'}}))[1] == []
    _, deltas = a.feed(chunk({"index": 0, "function": {"name": "f", "arguments": ":1}"}}))
    assert deltas == [
        {
            "index": 0,
            "id": "c",
            "type": "function",
            "function": {"name": "f", "arguments": '{"a":1}'},
        }
    ]


def test_assembler_passes_content_and_ignores_junk() -> None:
    a = ToolCallAssembler()
    assert a.feed({"choices": [{"delta": {"content": "hi"}}]}) == ("hi", [])
    assert a.feed({"nothing": 1}) == ("", [])
    assert a.feed({"choices": []}) == ("", [])
    assert a.merged() == []


def test_tools_keep_what_poe_allows() -> None:
    [tool] = parse_tools(
        [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {
                        "type": "object",
                        "properties": {"x": {"$ref": "#/definitions/X"}, "y": {"type": "integer"}},
                        "definitions": {"X": {"type": "string", "enum": ["a", "b"]}},
                        "additionalProperties": False,
                    },
                },
            }
        ],
        "auto",
    ) or [None]
    assert tool is not None
    assert tool.function.description == ""
    assert tool.function.parameters.properties == {
        "x": {"type": "string", "enum": ["a", "b"]},
        "y": {"type": "integer"},
    }
    assert parse_tools([], None) is None


@pytest.mark.parametrize(
    "tools",
    [{"type": "function"}, [{"type": "web_search"}], [{"type": "function", "function": {}}]],
)
def test_bad_tools_are_400(tools: object) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_tools(tools, None)
    assert info.value.status == 400 and info.value.param


def test_data_urls() -> None:
    f = from_data_url("data:image/png;base64," + base64.b64encode(b"abc").decode(), "p", 100)
    assert (f.data, f.mime, f.name) == (b"abc", "image/png", "image.png")
    with pytest.raises(OpenAIError) as info:
        from_data_url("data:image/png;base64," + base64.b64encode(b"x" * 200).decode(), "p", 100)
    assert info.value.status == 413
    with pytest.raises(OpenAIError):
        from_data_url("data:image/png,notbase64", "p", 100)


def test_image_and_file_parts() -> None:
    url = image_part({"image_url": {"url": "https://x.test/a/b.webp"}}, "p", 10)
    assert (url.url, url.name, url.mime, url.data) == (
        "https://x.test/a/b.webp",
        "b.webp",
        "image/webp",
        None,
    )
    pdf = file_part({"file": {"filename": "r.pdf", "file_data": "JVBERg=="}}, "p", 100)
    assert (pdf.name, pdf.mime, pdf.data) == ("r.pdf", "application/pdf", b"%PDF")
    same = file_part({"file": {"filename": "r.pdf", "file_data": "JVBERg=="}}, "p", 100)
    assert same.digest == pdf.digest != url.digest


@pytest.mark.parametrize(
    ("size", "aspect"),
    [
        ("1024x1024", "1:1"),
        ("1792x1024", "16:9"),
        ("1024x1792", "9:16"),
        ("1536x1024", "3:2"),
        ("auto", None),
    ],
)
def test_size_to_aspect(size: str, aspect: str | None) -> None:
    assert aspect_for(size) == aspect


def test_image_urls_from_answers() -> None:
    answer = "Here ![a](https://c.test/1.png) and ![b](<https://c.test/2.png>)\n\n[r]: https://c.test/3.png"
    assert image_urls(answer) == [
        "https://c.test/1.png",
        "https://c.test/2.png",
        "https://c.test/3.png",
    ]


def test_image_request_validation() -> None:
    m = ModelMap({"dall-e-3": "DALL-E-3"})
    req = parse_image_request({"prompt": "cat"}, m)
    assert (req.bot, req.n, req.response_format) == ("DALL-E-3", 1, "url")
    for body, param in [
        ({}, "prompt"),
        ({"prompt": "c", "n": 11}, "n"),
        ({"prompt": "c", "size": "big"}, "size"),
        ({"prompt": "c", "response_format": "png"}, "response_format"),
    ]:
        with pytest.raises(OpenAIError) as info:
            parse_image_request(body, m)
        assert info.value.param == param
