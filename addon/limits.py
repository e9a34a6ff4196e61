"""What the client asked the answer to respect: stop sequences, a token limit, JSON output.

Pure filters over the text on its way to the client; a filter that ends the answer tells the
caller, which then drops the Poe query.
"""

from __future__ import annotations

import json
import re
from typing import Any

from addon.textbuffer import TextBuffer
from addon.tokens import TokenCounter


class StopFilter:
    """Cuts the answer before the first stop sequence, even if the bot ignores ``stop``.

    Text that could be the start of a stop sequence is held back until the next piece shows
    whether it is one, so a stop sequence never reaches the client, in a stream either.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.held = ""
            return buf[: min(hits)]
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.stopped else held


class TokenLimit:
    """Ends the answer at ``limit`` tokens (max_tokens and friends)."""

    def __init__(self, counter: TokenCounter, limit: int | None) -> None:
        self.counter = counter
        self.limit = limit
        self._sent = TextBuffer()
        self.approx = 0  # sum of the pieces' counts: cheap, and never below the exact count
        self.reached = False

    def feed(self, text: str) -> str:
        if self.reached:
            return ""
        if self.limit is None or not text:
            return text
        self.approx += self.counter.count(text)
        if self.approx >= self.limit:
            sent = str(self._sent)
            candidate = sent + text
            self.approx = self.counter.count(candidate)
            if self.approx >= self.limit:
                self.reached = True
            if self.approx > self.limit:
                head = self.counter.prefix(candidate, self.limit)
                text = head[len(sent) :] if head.startswith(sent) else ""
        self._sent.append(text)
        return text


FENCE = re.compile(r"^\s*```[\w-]*\s*\n(.*?)\n?```\s*$", re.S)


def json_instruction(response_format: Any) -> str | None:
    """The instruction that asks a bot for JSON (Poe has no JSON mode): None for plain text."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return (
            "Answer with one valid JSON object and nothing else: no prose, no markdown code fences."
        )
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", {}) if isinstance(spec, dict) else {}
        return (
            "Answer with one valid JSON value and nothing else (no prose, no markdown code "
            "fences) that conforms to this JSON Schema:\n" + json.dumps(schema, ensure_ascii=False)
        )
    return None


def clean_json(text: str) -> str | None:
    """The answer as JSON text (code fences removed), or None when it does not parse."""
    candidate = text.strip()
    match = FENCE.match(candidate)
    if match:
        candidate = match.group(1).strip()
    try:
        json.loads(candidate)
    except ValueError:
        start = min((i for i in (candidate.find("{"), candidate.find("[")) if i >= 0), default=-1)
        end = max(candidate.rfind("}"), candidate.rfind("]"))
        if start < 0 or end <= start:
            return None
        try:
            json.loads(candidate[start : end + 1])
        except ValueError:
            return None
        return candidate[start : end + 1]
    return candidate
