"""What fastapi-poe's own bot server sends that our FakePoe scripts rarely do, through the proxy:
attachments (inline and not), data events, each error_type, a bot that raises, keep-alive pings
before the first event, meta with every key, suggested replies; and the QueryRequest as the
library parsed it. Most run against both stand-ins (same script, two serialisations)."""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

import httpx
import openai
import pytest
from conftest import POE_KEY
from fake_poe import Event, FakePoe, error, file, meta, replace, sleep, suggested, text
from harness import Mitmdump
from poe_reference import PING_SECONDS, PoeReference, fail, parsed_query

pytestmark = pytest.mark.both_stand_ins

USER = [{"role": "user", "content": "hi"}]
REFERENCE_ONLY = pytest.mark.poe_reference_only(reason="a bot only PoeReference has")
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def answer(proxy: Mitmdump, bot: str, stream: bool, **kwargs: Any) -> str:
    client = proxy.reverse_client()
    if not stream:
        made = client.chat.completions.create(model=bot, messages=USER, **kwargs)  # type: ignore[arg-type]
        return made.choices[0].message.content or ""
    chunks = client.chat.completions.create(model=bot, messages=USER, stream=True, **kwargs)  # type: ignore[arg-type]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def markdown_images(md: str) -> list[str]:
    """The URLs the images of a markdown text show (inline, or by a reference definition,
    which CommonMark only accepts at the start of a paragraph)."""
    defs = {
        m[1].lower(): m[2]
        for m in re.finditer(
            r"(?:\A|\n[ \t]*\n)[ ]{0,3}\[([^\]]+)\]:[ \t]*(\S+)[ \t]*(?=\n|\Z)", md
        )
    }
    inline = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", md)
    refs = [defs.get(r.lower(), "") for r in re.findall(r"!\[[^\]]*\]\[([^\]]+)\]", md)]
    return inline + refs


# --- attachments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_an_attachment_then_an_empty_text(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    url = "https://poe.test/cat.png"
    fake_poe.script(bot, [text("Here:"), file(url, "image/png", "cat.png"), text(" done")])
    got = answer(proxy, bot, stream)
    assert markdown_images(got) == [url]
    assert got.startswith("Here:") and got.endswith("done")


@pytest.mark.parametrize("stream", [False, True])
def test_an_inline_attachment_shows_where_the_text_refers_to_it(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    # post_message_attachment(is_inline=True): the file event comes before the text using it.
    url = "https://poe.test/chart.png"
    fake_poe.script(
        bot, [file(url, "image/png", "chart.png", inline_ref="ref1"), text("See ![chart][ref1].")]
    )
    got = answer(proxy, bot, stream)
    assert markdown_images(got) == [url], got
    assert "See " in got


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("inline_ref", [None, "img"])
def test_a_replacement_after_a_file_keeps_the_file(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, inline_ref: str | None, stream: bool
) -> None:
    url = "https://poe.test/out.png"
    final = "Here it is: ![out][img]" if inline_ref else "Here it is."
    fake_poe.script(
        bot,
        [
            replace("Generating..."),
            file(url, "image/png", "out.png", inline_ref=inline_ref),
            replace(final),
        ],
    )
    got = answer(proxy, bot, stream)
    # Poe's replacements rewrite the text, never the files; the status text is gone.
    assert markdown_images(got) == [url], got
    assert got.startswith("Here it is") and "Generating" not in got, got


@pytest.mark.parametrize("stream", [False, True])
def test_files_after_only_status_text_are_the_answer(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    url = "https://poe.test/only.png"
    fake_poe.script(bot, [replace("Generating image (40%)"), file(url, "image/png", "only.png")])
    got = answer(proxy, bot, stream)
    assert got == f"![only.png]({url})", got


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
def test_an_image_bot_that_shows_its_image_inline(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, response_format: str
) -> None:
    url = fake_poe.host_file(f"{bot}.png", PNG, "image/png")
    fake_poe.script(
        bot,
        [
            replace("Generating..."),
            file(url, "image/png", "out.png", inline_ref="img"),
            replace("Here it is: ![out][img]"),
        ],
    )
    result = proxy.reverse_client().images.generate(
        model=bot,
        prompt="a cat",
        response_format=response_format,  # type: ignore[arg-type]
    )
    assert result.data is not None and len(result.data) == 1
    if response_format == "url":
        assert result.data[0].url == url
    else:
        assert base64.b64decode(result.data[0].b64_json or "") == PNG


# --- events the proxy has no use for --------------------------------------------------------------


def test_data_events_meta_and_suggested_replies_leave_the_answer_alone(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(
        bot,
        [
            meta(
                content_type="text/plain",
                refetch_settings=True,
                linkify=False,
                suggested_replies=True,
            ),
            text("Hello"),
            Event("data", {"metadata": "kept by Poe for the next turn"}),
            text(" world"),
            suggested("Tell me more"),
        ],
    )
    for stream in (False, True):
        assert answer(proxy, bot, stream) == "Hello world"
    # fastapi-poe's client reports the data event it does not know back to the bot, and the
    # answer goes on.
    assert fake_poe.wait_for(lambda: len(fake_poe.reports_for(bot)) >= 2)
    assert "Unknown event type: data" in json.dumps(fake_poe.reports_for(bot))


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("allow_retry", [True, False])
@pytest.mark.parametrize(
    ("error_type", "status", "code"),
    [
        ("insufficient_fund", 429, "insufficient_quota"),
        ("user_message_too_long", 400, "context_length_exceeded"),
        ("user_caused_error", 400, None),
        ("privacy_authorization_error", 403, "permission_denied"),
        (None, 502, "poe_error"),
    ],
)
def test_each_error_type(
    proxy_passthrough: Mitmdump,
    fake_poe: FakePoe,
    bot: str,
    error_type: str | None,
    status: int,
    code: str | None,
    allow_retry: bool,
) -> None:
    fake_poe.script(bot, [error("It went wrong", allow_retry=allow_retry, error_type=error_type)])
    # The client's own key (pass-through): no configured key is benched for other tests.
    client = proxy_passthrough.reverse_client(api_key="poe-second-key")
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=bot, messages=USER, stream=stream)
        assert info.value.status_code == status and info.value.code == code
        assert "It went wrong" in info.value.message
        if status == 502:
            retry = info.value.response.headers.get("x-should-retry")
            assert (retry == "false") is (not allow_retry)


@REFERENCE_ONLY
def test_a_bot_that_raises(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("Partial"), sleep(0.2), fail("KeyError: 'secret-internal'")])
    client = proxy.reverse_client()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=bot, messages=USER)
    assert info.value.status_code == 502 and info.value.code == "poe_error"
    assert "unexpected issue" in info.value.message
    assert "secret-internal" not in json.dumps(info.value.body)  # raw_response stays at Poe
    got = ""
    with pytest.raises(openai.APIError) as streamed:
        for chunk in client.chat.completions.create(model=bot, messages=USER, stream=True):
            got += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert got == "Partial" and "unexpected issue" in streamed.value.message


def test_status_text_is_no_answer_when_the_bot_fails(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [replace("Thinking..."), sleep(0.1), error("Internal server error")])
    got = ""
    with pytest.raises(openai.APIError):
        for chunk in proxy.reverse_client().chat.completions.create(
            model=bot, messages=USER, stream=True
        ):
            got += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert "Thinking" not in got


# --- keep-alive pings and the parsed query ----------------------------------------------------


@REFERENCE_ONLY
@pytest.mark.parametrize("stream", [False, True])
def test_a_silent_bot_that_only_pings(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    # Pings before the first event and between events: comments, neither text nor activity.
    fake_poe.script(bot, [sleep(6 * PING_SECONDS), text("late"), sleep(3 * PING_SECONDS)])
    assert answer(proxy, bot, stream) == "late"


@REFERENCE_ONLY
def test_the_query_as_the_library_parsed_it(proxy: Mitmdump, fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [parsed_query()])
    made = proxy.reverse_client().chat.completions.create(
        model=bot,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
        temperature=0.5,
    )
    query = json.loads(made.choices[0].message.content or "")
    assert [(m["role"], m["content"]) for m in query["query"]] == [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("bot", "Hello!"),
        ("user", "Bye"),
    ]
    assert query["temperature"] == 0.5 and query["type"] == "query"
    recorded = fake_poe.requests_for(bot)[0]
    assert recorded.api_key == POE_KEY and recorded.query is not None
    assert recorded.query.conversation_id == query["conversation_id"]


# --- the stand-in keeps its promises ------------------------------------------------------------


def test_the_reference_sends_the_librarys_serialisation() -> None:
    with PoeReference(api_keys=(POE_KEY,)) as ref:
        ref.script("Pinger", [sleep(3 * PING_SECONDS), text("hi")])
        body = {
            "version": "1.0",
            "type": "query",
            "query": [{"role": "user", "content": "x"}],
            "user_id": "u",
            "conversation_id": "c",
            "message_id": "m",
        }
        with httpx.Client(trust_env=False, timeout=10) as http:
            started = time.monotonic()
            r = http.post(
                ref.base_url + "Pinger", json=body, headers={"authorization": f"Bearer {POE_KEY}"}
            )
            assert time.monotonic() - started >= 3 * PING_SECONDS
            assert r.status_code == 200 and r.headers["x-accel-buffering"] == "no"
            assert r.text.startswith(": ping") and "\r\n\r\nevent: text\r\n" in r.text
            assert r.text.endswith("event: done\r\ndata: {}\r\n\r\n")
            wrong = http.post(
                ref.base_url + "Pinger", json=body, headers={"authorization": "Bearer wrong"}
            )
            assert wrong.status_code == 401 and wrong.json() == {"detail": "Invalid access key"}
            assert wrong.headers["www-authenticate"] == "Bearer"
            unknown = http.post(
                ref.base_url + "Nobody", json=body, headers={"authorization": f"Bearer {POE_KEY}"}
            )
            assert unknown.status_code == 404 and unknown.json() == {"detail": "Not Found"}
