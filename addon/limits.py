"""What the client asked the answer to respect: stop sequences, a token limit, JSON output.

Pure filters over the text on its way to the client; a filter that ends the answer tells the
caller, which then drops the Poe query.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import referencing.exceptions

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


# Each start tried costs a parse up to where it fails (deeply nested openers nest the parser)
# and a schema check: bounded so that an answer made of brackets cannot hold the event loop.
MAX_JSON_TRIES = 256
_DECODER = json.JSONDecoder()
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


def clean_json(text: str, schema: dict[str, Any] | None = None) -> str | None:
    """The JSON value the answer contains, as the bot wrote it, or None when there is none.

    Found by parsing, not by cutting between brackets (prose such as ``Sure [1]: {...}`` has
    brackets too): the whole answer if it is one fitting JSON value, else the first position
    from which a complete value decodes that fits. Fitting means valid against ``schema``
    (response_format json_schema) or, without one (json_object), a JSON object. Code fences
    need no special case: the value inside them is found like any other.
    """
    candidate = text.strip()
    match = FENCE.match(candidate)
    if match:
        candidate = match.group(1).strip()
    fits = _fits_schema(schema) if schema is not None else _is_object
    try:
        if fits(json.loads(candidate)) or schema is None:
            # Without a schema a whole answer that is JSON stays what the bot said.
            return candidate
    except (ValueError, RecursionError):
        pass
    opener = re.compile(r"[{\[]" if schema is not None else r"\{")
    position = 0
    for _ in range(MAX_JSON_TRIES):
        found = opener.search(text, position)
        if found is None:
            break
        try:
            value, end = _DECODER.raw_decode(text, found.start())
        except (ValueError, RecursionError):
            position = found.start() + 1
            continue
        if fits(value):
            return text[found.start() : end]
        position = end  # a whole value that does not fit; what it contains is no answer
    return None


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def _fits_schema(schema: dict[str, Any]) -> Callable[[Any], bool]:
    validator = jsonschema.validators.validator_for(schema)(schema)

    def fits(value: Any) -> bool:
        try:
            return bool(validator.is_valid(value))
        except referencing.exceptions.Unresolvable:
            return True  # a $ref to elsewhere: never fetched, so the schema cannot be checked
        except Exception:  # defensive: check_json_schema already refused what we know fails
            return True  # the answer is paid for: a schema we cannot apply is no veto

    return fits


def check_json_schema(schema: Any) -> str | None:
    """Why ``schema`` (response_format json_schema) is no usable JSON Schema, or None."""
    if not isinstance(schema, dict):
        return "must be a JSON Schema object"
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        return f"is not a valid JSON Schema: {e.message}"
    return None
