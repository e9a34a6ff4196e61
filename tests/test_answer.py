"""How Poe's text / replace_response / file events become what a streaming client sees."""

from __future__ import annotations

import time

import pytest
from fastapi_poe.types import Attachment

from addon.answer import AnswerStream, attachment_markdown, is_status_text


def play(events: list[tuple[str, object]]) -> tuple[list[str], AnswerStream]:
    answer = AnswerStream()
    deltas: list[str] = []
    for kind, value in events:
        if kind == "text":
            deltas.append(answer.text(str(value)))
        elif kind == "replace":
            deltas.append(answer.replace(str(value)))
        elif kind == "file":
            assert isinstance(value, Attachment)
            deltas.append(answer.file(value))
    deltas.append(answer.finish())
    return [d for d in deltas if d], answer


def test_text_events_stream_one_delta_each() -> None:
    deltas, answer = play([("text", "Hel"), ("text", "lo"), ("text", " you")])
    assert deltas == ["Hel", "lo", " you"]
    assert answer.answer == answer.client == "Hello you"


def test_thinking_status_replaced_never_reaches_the_client() -> None:
    deltas, answer = play(
        [
            ("replace", "Thinking..."),
            ("replace", "Thinking... (2s elapsed)"),
            ("replace", ""),
            ("text", "The answer"),
            ("text", " is 4."),
        ]
    )
    assert deltas == ["The answer", " is 4."]
    assert "Thinking" not in "".join(deltas)
    assert answer.answer == "The answer is 4."


def test_status_sent_as_text_then_replaced_is_held_back() -> None:
    deltas, answer = play([("text", "Thinking..."), ("replace", "Hi"), ("text", " there")])
    assert deltas == ["Hi there"]
    assert answer.answer == "Hi there"


def test_replacement_with_final_answer_at_the_end() -> None:
    deltas, _ = play([("replace", "Generating image (40%)"), ("replace", "Done: a cat")])
    assert deltas == ["Done: a cat"]


def test_cumulative_replacements_stream_with_one_event_lag() -> None:
    deltas, answer = play([("replace", "Hel"), ("replace", "Hello"), ("replace", "Hello world")])
    assert deltas == ["Hel", "lo", " world"]
    assert answer.client == "Hello world"


def test_replacement_extending_sent_text_sends_only_the_new_part() -> None:
    deltas, answer = play([("text", "Hello"), ("replace", "Hello world"), ("text", "!")])
    assert deltas == ["Hello", " world!"]
    assert answer.client == answer.answer == "Hello world!"


def test_replacement_rewriting_sent_text_never_duplicates() -> None:
    deltas, answer = play([("text", "Hello "), ("replace", "Bye"), ("text", "!")])
    joined = "".join(deltas)
    assert joined == "Hello !"
    assert joined.count("Hello") == 1
    assert answer.answer == "Bye!"  # the non-streamed answer is Poe's final text


def test_plain_answer_starting_like_status_is_not_held_forever() -> None:
    deltas, _ = play([("text", "Thinking about it, "), ("text", "yes.")])
    assert "".join(deltas) == "Thinking about it, yes."
    assert deltas[0] == "Thinking about it, "


def test_status_only_answer_is_delivered_at_the_end() -> None:
    deltas, _ = play([("text", "Thinking...")])
    assert deltas == ["Thinking..."]


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("Thinking...", True),
        ("*Thinking...*", True),
        ("> Searching the web…", True),
        ("Thinking... (12s elapsed)", True),
        ("Generating image (35%)", True),
        ("", True),
        ("Thinking... done. The answer is 4", False),
        ("Hello", False),
        ("Running tests is good practice.", False),
    ],
)
def test_status_text(text: str, status: bool) -> None:
    assert is_status_text(text) is status


def test_files_become_markdown_links() -> None:
    image = Attachment(url="https://p.test/cat.png", content_type="image/png", name="cat.png")
    pdf = Attachment(url="https://p.test/r.pdf", content_type="application/pdf", name="r.pdf")
    _, answer = play([("text", "Here:"), ("file", image), ("file", pdf)])
    assert answer.client == (
        "Here:\n\n![cat.png](https://p.test/cat.png)\n\n[r.pdf](https://p.test/r.pdf)"
    )


def test_inline_ref_file_defines_the_reference() -> None:
    ref = Attachment(
        url="https://p.test/a.png", content_type="image/png", name="a.png", inline_ref="img1"
    )
    assert attachment_markdown(ref) == "[img1]: https://p.test/a.png"


def test_per_event_work_does_not_grow_with_the_answer() -> None:
    # A long answer must not be copied (or scanned) whole on every event.
    answer = AnswerStream()

    def batch() -> float:
        started = time.perf_counter()
        for _ in range(1000):
            answer.text("tok ")
        return time.perf_counter() - started

    early = min(batch() for _ in range(3))
    for _ in range(250):
        answer.text("word " * 800)  # a million characters
    late = min(batch() for _ in range(3))
    assert late < 5 * early, f"{late * 1000:.1f} ms vs {early * 1000:.1f} ms per 1000 events"
    assert answer.answer == answer.client and len(answer.answer) == 6000 * 4 + 250 * 4000
