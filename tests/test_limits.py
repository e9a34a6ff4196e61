"""Stop sequences, token limits and JSON checking (pure filters)."""

from __future__ import annotations

import pytest

from addon.limits import StopFilter, TokenLimit, clean_json
from addon.tokens import TokenCounter


def run_stop(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    f = StopFilter(stops)
    out = [f.feed(p) for p in pieces]
    out.append(f.flush())
    return [o for o in out if o], f.stopped


def test_stop_split_across_pieces_never_leaks() -> None:
    out, stopped = run_stop(["END"], ["Hello E", "N", "D and more"])
    assert out == ["Hello "] and stopped


def test_false_start_of_a_stop_is_released() -> None:
    out, stopped = run_stop(["END"], ["Hello E", "Nx", " done"])
    assert "".join(out) == "Hello ENx done" and not stopped


def test_earliest_of_several_stops_wins() -> None:
    out, _ = run_stop(["\n\n", "Q:"], ["A: yes Q: next\n\nmore"])
    assert out == ["A: yes "]


def test_no_stops_is_a_pass_through() -> None:
    assert run_stop([], ["a", "b"]) == (["a", "b"], False)


def test_token_limit_cuts_at_the_exact_token() -> None:
    counter = TokenCounter("gpt-4o")
    limit = TokenLimit(counter, 5)
    out = [limit.feed(p) for p in ["Hello world,", " this is", " a test of limits."]]
    text = "".join(out)
    assert counter.count(text) == 5 and limit.reached
    assert "Hello world, this is a test of limits.".startswith(text)
    assert limit.feed(" more") == ""


def test_token_limit_exactly_reached() -> None:
    limit = TokenLimit(TokenCounter("gpt-4o"), 2)
    assert limit.feed("Hello world") == "Hello world" and limit.reached


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ('{"a": 1}', '{"a": 1}'),
        ('```json\n{"a": 1}\n```', '{"a": 1}'),
        ('Sure! Here it is: {"a": [1, 2]} Hope that helps.', '{"a": [1, 2]}'),
        ("not json at all", None),
        ("{broken", None),
    ],
)
def test_clean_json(text: str, cleaned: str | None) -> None:
    assert clean_json(text) == cleaned
