"""How an answer is rendered and counted, as pure units: token counts of texts past the
tokenizer's limits, files in the answer's markdown, image URLs, held status text on failure."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator

import bpe_openai
import pytest
from fastapi_poe.types import Attachment

from addon import tokens
from addon.answer import AnswerStream
from addon.errors import PoeFailure
from addon.images import image_urls
from addon.poe import PoeError, PoeEvent
from addon.runner import ReplyRunner
from addon.tokens import TokenCounter, pieces

CAT = "https://pfst.test/cat.png"

# --- counting ---------------------------------------------------------------------------------


def mixed_text(n: int, seed: int = 1) -> str:
    """Words, numbers, punctuation, runs of spaces and line breaks, accents and CJK."""
    rnd = random.Random(seed)
    parts = ["hello", "World", "naïve", "日本語", "it's", "123", "4567", ",", ".", "!?", "\t"]
    gaps = ["", " ", "  ", "\n", "\n\n", " \n"]
    return "".join(rnd.choice(parts) + rnd.choice(gaps) for _ in range(n))


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
@pytest.mark.parametrize("size", [600, 1000, 7000])
def test_pieces_cut_at_word_starts_add_up_to_the_whole_count(name: str, size: int) -> None:
    encoding = bpe_openai.get_encoding(name)
    text = mixed_text(20_000)
    cut = pieces(text, size)
    assert "".join(cut) == text and all(len(p) <= size for p in cut) and len(cut) > 10
    assert all(p[0] == " " and p[1].isalpha() for p in cut[1:])  # every cut at a word start
    whole = len(encoding.encode_ordinary(text))
    assert sum(len(encoding.encode_ordinary(p)) for p in cut) == whole


@pytest.mark.parametrize(
    ("text", "model", "expected"),
    [
        ("a" * 1_200_000, "gpt-4o", 150_000),  # eight a's are one o200k token
        ("a" * 3_000_000, "gpt-4o", 375_000),
        ("ab" * 600_000, "gpt-4", 600_000),  # "ab" is one cl100k token
    ],
)
def test_counts_past_a_million_characters(text: str, model: str, expected: int) -> None:
    with pytest.raises(ValueError):  # what the tokenizer does with them alone
        bpe_openai.get_encoding(tokens.encoding_name(model)).encode_ordinary(text)
    assert TokenCounter(model).count(text) == expected


@pytest.mark.parametrize("pairs", [499_999, 500_000, 500_001])  # 999,998 to 1,000,002 characters
def test_counts_at_under_and_over_a_million_characters(pairs: int) -> None:
    assert TokenCounter("gpt-4").count("ab" * pairs) == pairs  # "ab" is one cl100k token


@pytest.mark.parametrize("n", [399_998, 400_000, 400_002])  # 199,999 to 200,001 tokens
def test_counts_at_under_and_over_two_hundred_thousand_tokens(n: int) -> None:
    assert TokenCounter("gpt-4o").count("ü" * n) == n // 2  # "üü" is one o200k token


def test_pieces_at_under_and_over_their_size() -> None:
    assert [len(p) for p in pieces("a" * 49_999)] == [49_999]
    assert [len(p) for p in pieces("a" * 50_000)] == [50_000]
    assert [len(p) for p in pieces("a" * 50_001)] == [50_000, 1]
    assert pieces("") == [""]


def test_counts_past_two_hundred_thousand_tokens_under_a_million_characters() -> None:
    text = mixed_text(120_000)
    assert len(text) < 1_000_000
    encoding = bpe_openai.get_encoding("o200k_base")
    with pytest.raises(bpe_openai.TokenLimitError) as info:
        encoding.encode_ordinary(text)
    assert TokenCounter("gpt-4o").count(text) == info.value.token_count  # exact


def test_prefix_of_a_text_past_the_limits() -> None:
    counter = TokenCounter("gpt-4o")
    text = "lorem ipsum dolor sit amet, " * 50_000  # 1.4 M characters, six tokens a sentence
    assert counter.prefix(text, 5) == "lorem ipsum dolor sit"
    head = counter.prefix(text, 150_000)
    assert text.startswith(head) and counter.count(head) == 150_000
    assert counter.prefix("a" * 1_200_000, 16) == "a" * 128


class BrokenEncoding:
    def encode_ordinary(self, text: str) -> list[int]:
        raise RuntimeError("tokenizer broke")

    def decode_bytes(self, tokens: list[int]) -> bytes:
        raise RuntimeError("tokenizer broke")


def test_a_failing_tokenizer_falls_back_to_the_estimate_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tokens, "_encoding", lambda name: BrokenEncoding())
    counter = TokenCounter("gpt-4o")
    with caplog.at_level(logging.WARNING):
        assert counter.count("x" * 10) == 3
        assert counter.messages(["abcd", "abcdefgh"]) == 1 + 2 + 3 + 3 + 3
        assert counter.prefix("abcdefghij", 2) == "abcdefgh"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "counting tokens failed (RuntimeError: tokenizer broke)" in lines[0]
    assert "\n" not in lines[0]


# --- files in the answer ------------------------------------------------------------------------


def attachment(
    url: str = CAT, inline_ref: str | None = None, kind: str = "image/png"
) -> Attachment:
    return Attachment(url=url, content_type=kind, name="cat.png", inline_ref=inline_ref)


def feed(*steps: str | Attachment) -> tuple[str, str]:
    """(what a stream sends, Poe's final answer)"""
    answer = AnswerStream()
    sent = ""
    for step in steps:
        sent += answer.file(step) if isinstance(step, Attachment) else answer.text(step)
    sent += answer.finish()
    return sent, answer.answer


def test_an_inline_definition_before_its_text_stands_alone() -> None:
    sent, final = feed(attachment(inline_ref="gP3BpSJo"), "", "![cat][gP3BpSJo] Here.")
    assert sent == final == f"[gP3BpSJo]: {CAT}\n\n![cat][gP3BpSJo] Here."


def test_an_inline_definition_after_a_line_gets_a_blank_line_before_it() -> None:
    # A definition cannot interrupt a paragraph: "text\n[r]: url" would be paragraph text.
    sent, _ = feed("![cat][r]\n", attachment(inline_ref="r"), "\nMore.")
    assert sent == f"![cat][r]\n\n[r]: {CAT}\nMore."
    sent, _ = feed("![cat][r]", attachment(inline_ref="r"), "More.")
    assert sent == f"![cat][r]\n\n[r]: {CAT}\n\nMore."


def test_a_file_at_the_end_adds_no_trailing_space() -> None:
    assert feed("Here", attachment())[0] == f"Here\n\n![cat.png]({CAT})"
    assert feed(attachment(inline_ref="r"))[0] == f"[r]: {CAT}"


def test_a_file_already_linked_in_the_text_is_not_shown_again() -> None:
    assert feed(f"![cat]({CAT})", attachment())[0] == f"![cat]({CAT})"
    other = "https://pfst.test/dog.png"
    assert feed(f"![cat]({CAT})", attachment(other))[0] == (f"![cat]({CAT})\n\n![cat.png]({other})")


def test_image_urls_stop_at_the_urls_end() -> None:
    assert image_urls(f"[gP3BpSJo]: {CAT}![cat][gP3BpSJo]") == [CAT]  # glued, as before the fix
    assert image_urls(f'[r]: <{CAT}> "a title"') == [CAT]
    assert image_urls(f"[r]: {CAT}[x]") == [CAT]
    assert image_urls(f"![a]({CAT})Then text") == [CAT]
    assert image_urls(f"[r]: {CAT}?w=1&h=2\n![cat][r]") == [f"{CAT}?w=1&h=2"]


# --- status text and failures -------------------------------------------------------------------


def test_abandon_drops_held_status_but_keeps_held_content() -> None:
    answer = AnswerStream()
    assert answer.replace("Thinking...") == ""
    assert answer.replace("Thinking... (1s elapsed)") == ""
    assert answer.abandon() == ""
    answer = AnswerStream()
    assert answer.text("Partial") == "Partial"
    assert answer.replace("Partial answer, rewritten") == ""  # held until confirmed
    assert answer.abandon() == " answer, rewritten"  # real text: the client gets it


async def scripted(*events: PoeEvent | PoeError) -> AsyncIterator[PoeEvent]:
    for event in events:
        await asyncio.sleep(0)
        if isinstance(event, PoeError):
            raise event
        yield event


BROKE = PoeError(PoeFailure("b", event={"text": "no points", "error_type": "insufficient_fund"}))


def test_first_waits_past_status_text_so_a_failure_decides_the_status() -> None:
    async def main() -> None:
        events = scripted(
            PoeEvent("meta"),
            PoeEvent("suggested", text="Ask again?"),
            PoeEvent("replace", text="Thinking..."),
            PoeEvent("replace", text="Thinking... (1s elapsed)"),
            BROKE,
        )
        runner = ReplyRunner(0, events, TokenCounter("gpt-4o"), bot="b")
        with pytest.raises(PoeError):
            await runner.first()

    asyncio.run(main())


def test_first_returns_at_real_content_after_status_text() -> None:
    async def main() -> list[str]:
        events = scripted(
            PoeEvent("replace", text="Thinking..."),
            PoeEvent("replace", text=""),
            PoeEvent("text", text="Four"),
            PoeEvent("text", text="."),
        )
        runner = ReplyRunner(0, events, TokenCounter("gpt-4o"), bot="b")
        await runner.first()
        assert [p.text for p in runner._pending] == ["Four"]
        return [p.text async for p in runner.pieces()]

    assert "".join(asyncio.run(main())) == "Four."


TOOL_CALL = {
    "choices": [
        {
            "index": 0,
            "delta": {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": "{}"},
                    }
                ]
            },
        }
    ]
}


def test_a_failure_mid_answer_never_releases_held_status_text() -> None:
    async def main() -> list[str]:
        events = scripted(
            PoeEvent("data", data=TOOL_CALL),  # the answer begins: the status line goes out
            PoeEvent("replace", text="Thinking..."),
            PoeEvent("replace", text="Thinking... (2s elapsed)"),
            BROKE,
        )
        runner = ReplyRunner(0, events, TokenCounter("gpt-4o"), bot="b")
        await runner.first()
        assert runner._pending and runner._pending[0].tool_calls
        sent: list[str] = []
        with pytest.raises(PoeError):
            async for piece in runner.pieces():
                sent.append(piece.text)
        return sent

    assert "".join(asyncio.run(main())) == ""


def test_the_first_event_time_is_the_status_texts_not_the_answers() -> None:
    async def status_then_answer() -> AsyncIterator[PoeEvent]:
        yield PoeEvent("replace", text="Thinking...")
        await asyncio.sleep(0.3)
        yield PoeEvent("text", text="Four.")

    async def main() -> tuple[float, float, float]:
        runner = ReplyRunner(0, status_then_answer(), TokenCounter("gpt-4o"), bot="b")
        start = time.monotonic()
        await runner.first()
        assert runner.first_event_at is not None
        return start, runner.first_event_at, time.monotonic()

    start, first_event, answered = asyncio.run(main())
    assert first_event - start < 0.2 <= answered - start
