"""mitmproxy content views for answered flows: the SSE stream as the answer it assembles to, and
the Poe query a request became. Rendering is pure; registration is in poe_openai.py."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from mitmproxy import contentviews

METADATA_KEY = "poe_openai"


def sse_events(data: bytes) -> list[dict[str, Any]]:
    events = []
    for block in data.decode("utf-8", "replace").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: ") and line[6:].strip() != "[DONE]":
                try:
                    value = json.loads(line[6:])
                except ValueError:
                    continue
                if isinstance(value, dict):
                    events.append(value)
    return events


def assemble(data: bytes) -> str:
    """An OpenAI SSE stream (chat, legacy completions or Responses) as readable text."""
    texts: dict[int, str] = defaultdict(str)
    calls: dict[tuple[int, int], dict[str, str]] = {}
    usage: Any = None
    errors: list[str] = []
    finish: dict[int, str] = {}
    for event in sse_events(data):
        if "error" in event and isinstance(event["error"], dict):
            errors.append(str(event["error"].get("message")))
            continue
        kind = event.get("type")
        if kind == "response.output_text.delta":
            texts[int(event.get("output_index", 0))] += str(event.get("delta", ""))
        elif kind == "response.function_call_arguments.done":
            calls[(int(event.get("output_index", 0)), 0)] = {
                "name": str(event.get("name")),
                "arguments": str(event.get("arguments")),
            }
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            usage = event.get("response", {}).get("usage") or usage
            if kind == "response.failed":
                errors.append(str(event.get("response", {}).get("error")))
        elif kind == "error":
            errors.append(str(event.get("message")))
        for choice in event.get("choices") or []:
            index = int(choice.get("index", 0))
            if "text" in choice:  # legacy completions
                texts[index] += str(choice.get("text") or "")
            delta = choice.get("delta") or {}
            texts[index] += str(delta.get("content") or "")
            for call in delta.get("tool_calls") or []:
                entry = calls.setdefault(
                    (index, int(call.get("index", 0))), {"name": "", "arguments": ""}
                )
                fn = call.get("function") or {}
                entry["name"] = fn.get("name") or entry["name"]
                entry["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                finish[index] = choice["finish_reason"]
        if event.get("usage"):
            usage = event["usage"]
    lines = []
    for index in sorted(texts):
        head = f"[choice {index}]" if len(texts) > 1 else "[answer]"
        lines += [f"{head} (finish: {finish.get(index, '-')})", texts[index], ""]
    for (_, call_index), call in sorted(calls.items()):
        lines.append(f"[tool call {call_index}] {call['name']}({call['arguments']})")
    if usage:
        lines.append(f"[usage] {json.dumps(usage)}")
    for message in errors:
        lines.append(f"[error] {message}")
    return "\n".join(lines).strip() + "\n"


def _ours(metadata: contentviews.Metadata) -> dict[str, Any] | None:
    flow = metadata.flow
    meta = getattr(flow, "metadata", {}).get(METADATA_KEY) if flow is not None else None
    return meta if isinstance(meta, dict) else None


class OpenAIStreamView(contentviews.Contentview):
    """An answered SSE stream, assembled: text, tool calls, usage, errors."""

    name = "OpenAI stream"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        return assemble(data)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        if (metadata.content_type or "").startswith("text/event-stream") and data:
            return 2 if _ours(metadata) is not None else 0.5
        return 0


class PoeQueryView(contentviews.Contentview):
    """The Poe query an answered request became (messages after translation, parameters)."""

    name = "Poe query"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        meta = _ours(metadata) or {}
        query = meta.get("poe", {}).get("poe_query")
        if query is None:
            return "(no Poe query recorded for this flow)\n"
        return json.dumps(query, indent=2, ensure_ascii=False) + "\n"

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        meta = _ours(metadata)
        is_request = metadata.flow is not None and metadata.http_message is getattr(
            metadata.flow, "request", None
        )
        return 2 if meta and meta.get("poe", {}).get("poe_query") and is_request else 0


VIEWS = (OpenAIStreamView(), PoeQueryView())
