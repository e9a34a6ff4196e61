"""Once Poe has answered, the client gets the answer: no step the proxy takes afterwards
(counting tokens, rendering, the flow's comment, the response store) may lose it. Also how a
bot's files and status text reach the client. Real mitmdump, official openai SDK."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, echo, error, file, raw, replace, sleep, text
from harness import Mitmdump, assert_no_traceback
from mitmproxy import io as mitmio

BIG = 1_200_000  # characters: over bpe-openai's 1,000,000 limit, far under poe_max_body_mb
TEXTS = {
    "one-character": "a" * BIG,
    "alternating": "ab" * (BIG // 2),
    "words": ("lorem ipsum dolor sit amet, " * (BIG // 28 + 1))[:BIG],
}
# o200k_base (any bot name): "aaaaaaaa" is one token, so this count is exact and known.
ONE_CHARACTER_TOKENS = BIG // 8
KINDS = ["json", "stream", "stream+usage"]


def ask_chat(client: openai.OpenAI, bot: str, content: str, kind: str) -> tuple[str, Any]:
    messages = [{"role": "user", "content": content}]
    if kind == "json":
        done = client.chat.completions.create(model=bot, messages=messages)  # type: ignore[arg-type]
        return done.choices[0].message.content or "", done.usage
    options = {"stream_options": {"include_usage": True}} if kind == "stream+usage" else {}
    chunks = list(
        client.chat.completions.create(model=bot, messages=messages, stream=True, **options)  # type: ignore[arg-type, call-overload]
    )
    assert chunks[-1].usage is not None if kind == "stream+usage" else chunks[-1].choices
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage


def ask_completions(client: openai.OpenAI, bot: str, prompt: str, kind: str) -> tuple[str, Any]:
    # max_tokens: this endpoint's default is 16; a high limit is counted on every piece
    options: dict[str, Any] = {"max_tokens": 1_000_000}
    if kind == "json":
        done = client.completions.create(model=bot, prompt=prompt, **options)
        return done.choices[0].text, done.usage
    if kind == "stream+usage":
        options["stream_options"] = {"include_usage": True}
    chunks = list(client.completions.create(model=bot, prompt=prompt, stream=True, **options))  # type: ignore[call-overload]
    assert chunks[-1].usage is not None if kind == "stream+usage" else chunks[-1].choices
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage


def ask_responses(client: openai.OpenAI, bot: str, text_in: str, kind: str) -> tuple[str, Any]:
    if kind == "json":
        done = client.responses.create(model=bot, input=text_in)
        return done.output_text, done.usage
    events = list(client.responses.create(model=bot, input=text_in, stream=True))
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1, [e.type for e in events][-5:]
    answer = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    return answer, completed[0].response.usage


ENDPOINTS = {"chat": ask_chat, "completions": ask_completions, "responses": ask_responses}
# The Responses API always sends usage: "stream" covers it.
CASES = [(e, k) for e in ENDPOINTS for k in KINDS if (e, k) != ("responses", "stream+usage")]


def token_counts(endpoint: str, usage: Any) -> tuple[int, int]:
    if endpoint == "responses":
        return usage.input_tokens, usage.output_tokens
    return usage.prompt_tokens, usage.completion_tokens


# --- 1. a long message (item 1) ---------------------------------------------------------------


@pytest.mark.parametrize(("endpoint", "kind"), CASES)
@pytest.mark.parametrize("shape", list(TEXTS))
def test_a_long_message_is_answered_and_counted(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, shape: str, endpoint: str, kind: str
) -> None:
    """1.2 MB texts used to reach Poe, be answered (and paid), then become a 500 or a cut
    stream: bpe-openai refuses texts of 1,000,000 characters."""
    big = TEXTS[shape]
    fake_poe.script(bot, [echo()])  # the answer is as long as the question
    before = len(proxy.lines)
    answer, usage = ENDPOINTS[endpoint](proxy.reverse_client(), bot, big, kind)
    assert answer == big
    assert len(fake_poe.requests_for(bot)) == 1  # answered once, no retry
    if usage is not None:
        prompt, completion = token_counts(endpoint, usage)
        if shape == "one-character":
            assert completion == ONE_CHARACTER_TOKENS
        assert BIG // 10 < completion < BIG // 2  # counted, not a character estimate
        assert prompt >= completion
    log = "".join(proxy.lines[before:])
    assert "failed" not in log and "internal error" not in log, log[-2000:]


# 300,000 CJK characters: under the 1,000,000-character limit, yet 569,835 o200k tokens, over
# bpe-openai's other limit of 200,000 tokens a call (the count is the one its error reports).
MANY_TOKENS = "".join(chr(0x4E00 + i % 20_000) for i in range(300_000))
MANY_TOKENS_COUNT = 569_835


@pytest.mark.parametrize(("endpoint", "kind"), CASES)
def test_a_message_of_many_tokens_under_a_million_characters(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, endpoint: str, kind: str
) -> None:
    fake_poe.script(bot, [echo()])
    answer, usage = ENDPOINTS[endpoint](proxy.reverse_client(), bot, MANY_TOKENS, kind)
    assert answer == MANY_TOKENS
    if usage is not None:
        prompt, completion = token_counts(endpoint, usage)
        assert completion == MANY_TOKENS_COUNT
        assert prompt >= MANY_TOKENS_COUNT


# --- 2. a failing post-answer step never loses the answer (item 1, the general rule) -----------

BREAK_COUNTING_AND_STORE = '''
"""Test helper loaded after the addon: the tokenizer and the Responses store fail."""
import addon.responses
import addon.tokens


class BrokenEncoding:
    def encode_ordinary(self, text):
        raise RuntimeError("tokenizer broke")

    def decode_bytes(self, tokens):
        raise RuntimeError("tokenizer broke")


def broken_put(self, response, conversation, owner=""):
    raise RuntimeError("store broke")


addon.tokens._encoding = lambda name: BrokenEncoding()
addon.responses.ResponseStore.put = broken_put
'''


@pytest.fixture(scope="module")
def broken_proxy(fake_poe: FakePoe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mitmdump]:
    script = tmp_path_factory.mktemp("broken") / "break_counting_and_store.py"
    script.write_text(BREAK_COUNTING_AND_STORE)
    opts = poe_options(fake_poe, poe_api_key=POE_KEY)
    with Mitmdump(options=opts, regular=False, extra_args=["-s", str(script)]) as m:
        yield m


@pytest.mark.parametrize(("endpoint", "kind"), CASES)
def test_a_failing_count_or_store_still_delivers_the_answer(
    broken_proxy: Mitmdump, fake_poe: FakePoe, bot: str, endpoint: str, kind: str
) -> None:
    fake_poe.script(bot, [text("The answer"), text(" you paid for.")])
    before = len(broken_proxy.lines)
    answer, usage = ENDPOINTS[endpoint](broken_proxy.reverse_client(), bot, "x" * 400, kind)
    assert answer == "The answer you paid for."
    if usage is not None:  # the estimate: four characters a token
        prompt, completion = token_counts(endpoint, usage)
        assert completion == math.ceil(len(answer) / 4)
        assert prompt >= 100
    # the log line may follow the answer's last byte (a stream counts after [DONE])
    deadline = time.monotonic() + 10
    done = re.compile(rf"->{bot} \S+ (streamed|answered) in")
    while not done.search("".join(broken_proxy.lines[before:])) and time.monotonic() < deadline:
        time.sleep(0.05)
    log = "".join(broken_proxy.lines[before:])
    assert_no_traceback(log)
    assert len(re.findall(r"counting tokens failed \(RuntimeError: tokenizer broke\)", log)) == 1
    if endpoint == "responses":
        assert "storing the response failed (RuntimeError: store broke)" in log


def test_max_tokens_with_a_failing_tokenizer_still_answers(
    broken_proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("one two three four five six seven eight")])
    done = broken_proxy.reverse_client().chat.completions.create(
        model=bot, messages=[{"role": "user", "content": "count"}], max_tokens=2
    )
    assert done.choices[0].message.content == "one two "  # the estimate's 2 x 4 characters
    assert done.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_json_cut_by_the_clients_own_stop_sequence_is_delivered(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    # Poe answered valid JSON; the client's stop sequence cut it. Refusing the cut text as
    # "invalid JSON" (502) lost an answer the proxy itself had shortened.
    fake_poe.script(bot, [text('{"a": 1, '), text('"b": 2}')])
    request: dict[str, Any] = {
        "model": bot,
        "messages": [{"role": "user", "content": "json please"}],
        "response_format": {"type": "json_object"},
        "stop": [","],
    }
    client = proxy.reverse_client()
    if stream:
        chunks = list(client.chat.completions.create(**request, stream=True))
        answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        done = client.chat.completions.create(**request)
        answer, finish = done.choices[0].message.content or "", done.choices[0].finish_reason
    assert (answer, finish) == ('{"a": 1', "stop")


# --- 3. rendering: a bot's text that UTF-8 cannot encode (sibling) -----------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_an_emoji_cut_in_two_by_the_bot_reaches_the_client_whole(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    # A bot that streams UTF-16 code units can cut a surrogate pair across two events; the
    # halves are lone surrogates in Python, and UTF-8 JSON could not encode them (a 500).
    halves = [
        'event: text\ndata: {"text": "smile \\ud83d"}\n\n',
        'event: text\ndata: {"text": "\\ude00"}\n\n',
    ]
    fake_poe.script(bot, [raw(halves[0]), raw(halves[1])])
    client = proxy.reverse_client()
    if stream:
        # each half is its own chunk: the SDK decodes each to a lone surrogate
        chunks = client.chat.completions.create(
            model=bot, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert answer == "smile \ud83d\ude00"
    else:
        done = client.chat.completions.create(
            model=bot, messages=[{"role": "user", "content": "hi"}]
        )
        assert done.choices[0].message.content == "smile \U0001f600"


# --- 4. inline attachments (item 15) and duplicated pictures (issue 14) ------------------------

CAT = "https://pfst.test/inline/cat.png"


def chat_answer(client: openai.OpenAI, bot: str, stream: bool) -> str:
    messages = [{"role": "user", "content": "draw a cat"}]
    if stream:
        chunks = client.chat.completions.create(model=bot, messages=messages, stream=True)  # type: ignore[arg-type]
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    done = client.chat.completions.create(model=bot, messages=messages)  # type: ignore[arg-type]
    return done.choices[0].message.content or ""


def definitions(answer: str) -> dict[str, str]:
    """The reference definitions a CommonMark reader finds: own line, after a blank line."""
    found = {}
    for block in answer.split("\n\n"):
        match = re.fullmatch(r"\[([^\]]+)\]: (\S+)", block.strip("\n"))
        if match:
            found[match.group(1)] = match.group(2)
    return found


@pytest.mark.parametrize("stream", [False, True])
def test_an_inline_attachment_before_its_text_is_a_clean_definition(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    # what fastapi-poe's own server sends for post_message_attachment(..., is_inline=True)
    fake_poe.script(
        bot,
        [
            file(CAT, "image/png", "cat.png", inline_ref="gP3BpSJo"),
            text(""),
            text("![cat][gP3BpSJo]"),
        ],
    )
    answer = chat_answer(proxy.reverse_client(), bot, stream)
    assert definitions(answer) == {"gP3BpSJo": CAT}
    assert "![cat][gP3BpSJo]" in answer.split("\n\n")


@pytest.mark.parametrize("stream", [False, True])
def test_an_inline_attachment_after_text_is_a_clean_definition(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    fake_poe.script(
        bot,
        [
            text("Here:\n![cat][ref1]\n"),
            file(CAT, "image/png", "cat.png", inline_ref="ref1"),
            text("Enjoy."),
        ],
    )
    answer = chat_answer(proxy.reverse_client(), bot, stream)
    assert definitions(answer) == {"ref1": CAT}
    assert answer.endswith("\n\nEnjoy.")


@pytest.mark.parametrize("stream", [False, True])
def test_text_after_a_file_link_starts_a_new_paragraph(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    fake_poe.script(bot, [file(CAT, "image/png", "cat.png"), text("A cat.")])
    answer = chat_answer(proxy.reverse_client(), bot, stream)
    assert answer == f"![cat.png]({CAT})\n\nA cat."


@pytest.mark.parametrize("stream", [False, True])
def test_a_picture_linked_in_text_and_sent_as_a_file_shows_once(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    fake_poe.script(bot, [text(f"Done: ![cat]({CAT})"), file(CAT, "image/png", "cat.png")])
    answer = chat_answer(proxy.reverse_client(), bot, stream)
    assert answer == f"Done: ![cat]({CAT})"


@pytest.mark.parametrize("inline", [True, False])
def test_images_endpoint_returns_the_url_itself(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, inline: bool
) -> None:
    if inline:
        steps = [file(CAT, "image/png", "cat.png", inline_ref="dAedMMnH"), text("![cat][dAedMMnH]")]
    else:
        steps = [
            text("Here is your cat"),
            file(CAT, "image/png", "cat.png"),
            text("Anything else?"),
        ]
    fake_poe.script(bot, steps)
    result = proxy.reverse_client().images.generate(model=bot, prompt="a cat")
    assert result.data is not None and [d.url for d in result.data] == [CAT]


# --- 5. status text and failures (item 16) ------------------------------------------------------

THINKING_THEN_BROKE = [
    replace("Thinking..."),
    sleep(0.05),
    replace("Thinking... (1s elapsed)"),
    error("You do not have enough points", error_type="insufficient_fund"),
]


@pytest.mark.parametrize("stream", [False, True])
def test_a_failure_after_status_text_is_a_real_status(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, stream: bool
) -> None:
    fake_poe.script(bot, THINKING_THEN_BROKE)  # type: ignore[arg-type]
    client = proxy.reverse_client()
    with pytest.raises(openai.RateLimitError) as info:
        if stream:
            list(
                client.chat.completions.create(
                    model=bot, messages=[{"role": "user", "content": "hi"}], stream=True
                )
            )
        else:
            client.chat.completions.create(model=bot, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 429
    assert "Thinking" not in str(info.value.body)


@pytest.fixture(scope="module")
def short_hold_proxy(fake_poe: FakePoe) -> Iterator[Mitmdump]:
    opts = poe_options(fake_poe, poe_api_key=POE_KEY, poe_header_hold_s="1")
    with Mitmdump(options=opts, regular=False) as m:
        yield m


def test_status_text_is_never_sent_before_a_late_failure(
    short_hold_proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    # The failure comes after poe_header_hold_s: the stream has begun (200), so it is an
    # error event; the held "Thinking..." must not go out before it.
    fake_poe.script(bot, [replace("Thinking..."), sleep(1.6), *THINKING_THEN_BROKE[2:]])  # type: ignore[list-item]
    with short_hold_proxy.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={"model": bot, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
    assert r.status_code == 200
    assert "Thinking" not in r.text
    assert '"error"' in r.text and "insufficient_quota" in r.text


def test_status_text_then_the_answer_streams_only_the_answer(
    short_hold_proxy: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [replace("Thinking..."), sleep(0.2), replace(""), text("Four.")])
    chunks = list(
        short_hold_proxy.reverse_client().chat.completions.create(
            model=bot, messages=[{"role": "user", "content": "2+2?"}], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Four."


# --- 6. the flow comment's token figure is the usage's (issue 14) ------------------------------


def test_flow_comment_shows_the_usage_the_client_got(
    fake_poe: FakePoe, bot: str, tmp_path: Path
) -> None:
    fake_poe.script(bot, [text("a a a a a a "), text("a a a a a a")])
    flows = tmp_path / "flows.mitm"
    opts = poe_options(fake_poe, poe_api_key=POE_KEY)
    usages = []
    with Mitmdump(options=opts, regular=False, extra_args=["-w", str(flows)]) as m:
        client = m.reverse_client()
        usages.append(ask_chat(client, bot, "hi", "json")[1].completion_tokens)
        usages.append(ask_chat(client, bot, "hi", "stream+usage")[1].completion_tokens)
        usages.append(ask_completions(client, bot, "hi", "json")[1].completion_tokens)
        usages.append(ask_responses(client, bot, "hi", "stream")[1].output_tokens)
    with flows.open("rb") as f:
        comments = [flow.comment for flow in mitmio.FlowReader(f).stream()]
    assert len(comments) == 4
    figures = [int(re.search(r"(\d+) completion tokens", c).group(1)) for c in comments]  # type: ignore[union-attr]
    assert figures == usages
    assert usages[0] == 12  # counted (the old figure, characters / 4, said 5)
