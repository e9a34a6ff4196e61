"""The Responses API (``/v1/responses``): input items -> a chat conversation, and the answer ->
Response objects and the exact stream event sequence. Pure functions and plain data.

A Responses request is rewritten as the equivalent chat completions body and parsed by chat.py,
so tools, pictures, files, limits and JSON mode behave exactly as in chat completions.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from addon.chat import ChatRequest, parse_chat_request
from addon.errors import OpenAIError, bad_request
from addon.mappings import ModelMap

# --- request ------------------------------------------------------------------------------------


def _content_part(part: object, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise bad_request(f"{where} must be an object.", where)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text")}
    if kind == "refusal":
        return {"type": "text", "text": str(part.get("refusal") or "")}
    if kind == "input_image":
        if part.get("file_id") and not part.get("image_url"):
            raise bad_request(
                f"{where}.file_id refers to OpenAI's Files API, which is not available through "
                "Poe; send image_url (an http(s) or data: URL).",
                f"{where}.file_id",
            )
        return {"type": "image_url", "image_url": {"url": part.get("image_url")}}
    if kind == "input_file":
        spec = {k: part[k] for k in ("file_data", "filename", "file_id") if k in part}
        if part.get("file_url") and not part.get("file_data"):
            raise bad_request(
                f"{where}.file_url: send the file inline as file_data.", f"{where}.file_url"
            )
        return {"type": "file", "file": spec}
    raise bad_request(
        f"{where}: content type {kind!r} is not supported through Poe.", f"{where}.type"
    )


# Item types of the spec's input union (InputItem / Item) that have no Poe equivalent: OpenAI's
# hosted tools and their outputs, client-side tools this proxy cannot declare (custom, shell,
# apply_patch: only function tools reach a bot), MCP bookkeeping, and OpenAI-encrypted context.
REFUSED_ITEMS: dict[str, str] = {
    **dict.fromkeys(
        (
            "file_search_call",
            "web_search_call",
            "image_generation_call",
            "code_interpreter_call",
            "computer_call",
            "computer_call_output",
            "tool_search_call",
            "tool_search_output",
            "additional_tools",
            "program",
            "program_output",
        ),
        "it belongs to one of OpenAI's built-in tools, which Poe does not run (Poe has bots "
        "for such jobs, e.g. a -Search bot)",
    ),
    **dict.fromkeys(
        (
            "local_shell_call",
            "local_shell_call_output",
            "shell_call",
            "shell_call_output",
            "apply_patch_call",
            "apply_patch_call_output",
            "custom_tool_call",
            "custom_tool_call_output",
        ),
        "only function tools can be sent to Poe; declare the tool as a function and send "
        "function_call / function_call_output items",
    ),
    **dict.fromkeys(
        ("mcp_list_tools", "mcp_approval_request", "mcp_approval_response", "mcp_call"),
        "remote MCP servers are an OpenAI-hosted tool, which Poe does not run",
    ),
    **dict.fromkeys(
        ("compaction", "compaction_trigger"),
        "compaction works on context encrypted by OpenAI, which no Poe bot can read; resend the "
        "conversation instead",
    ),
}

ItemLookup = Callable[[str], "dict[str, Any] | None"]


def unknown_item(item_id: str, where: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"{where}: no item with id '{item_id}' found. Only the output of responses this proxy "
        "stored can be referenced (they are kept for a limited time and number; see "
        "poe_response_store_size / poe_response_store_minutes); send the item itself instead.",
        "invalid_request_error",
        "not_found",
        where,
    )


def _function_output(output: object, where: str) -> str:
    """A function_call_output's ``output``: a string, or text parts (joined)."""
    if isinstance(output, str):
        return output
    if not isinstance(output, list):
        return json.dumps(output)
    texts = []
    for j, part in enumerate(output):
        if not isinstance(part, dict) or part.get("type") != "input_text":
            kind = part.get("type") if isinstance(part, dict) else None
            # A bot reads a tool result as text only: a picture or file here would be lost.
            raise bad_request(
                f"{where}.output[{j}]: content type {kind!r} is not supported in a function "
                "result through Poe; send the result as text.",
                f"{where}.output[{j}].type",
            )
        texts.append(str(part.get("text") or ""))
    return "\n".join(texts)


def _item_kind(item: dict[str, Any]) -> object:
    kind = item.get("type")
    if kind is None:
        # The spec's item_reference may omit its type; a message always has a role.
        return "item_reference" if "role" not in item and "id" in item else "message"
    return kind


def referenced_ids(value: object) -> list[str]:
    """The item ids an ``input`` refers to (item_reference items), for fetching them first:
    the lookup input_to_messages takes is a plain function of what was fetched."""
    if not isinstance(value, list):
        return []
    return [
        item["id"]
        for item in value
        if isinstance(item, dict)
        and _item_kind(item) == "item_reference"
        and isinstance(item.get("id"), str)
    ]


def references_too_large(limit: int, where: str) -> OpenAIError:
    return OpenAIError(
        413,
        f"{where}: the items referenced by item_reference add up to more than this proxy "
        f"accepts in one request ({limit // (1024 * 1024)} MB; see poe_max_body_mb).",
        "invalid_request_error",
        "request_too_large",
        where,
    )


def input_to_messages(
    value: object, lookup: ItemLookup | None = None, max_reference_bytes: int = 64 * 1024 * 1024
) -> list[dict[str, Any]]:
    """Responses ``input`` (a string or items) as chat completions messages.

    ``lookup`` finds an earlier output item by id, for ``item_reference`` items. A reference
    costs what its item would have cost inline, so a small body cannot repeat a long stored
    answer into a query of gigabytes: together they may hold ``max_reference_bytes`` of JSON.
    """
    sizes: dict[str, int] = {}
    referenced = 0
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("input must be a string or a non-empty array of items.", "input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object.", where)
        kind = _item_kind(item)
        if kind == "item_reference":
            item_id = item.get("id")
            if not isinstance(item_id, str) or not item_id:
                raise bad_request(f"{where}.id must be the id of an earlier item.", f"{where}.id")
            found = lookup(item_id) if lookup is not None else None
            if found is None:
                raise unknown_item(item_id, where)
            if item_id not in sizes:
                sizes[item_id] = len(json.dumps(found))
            referenced += sizes[item_id]
            if referenced > max_reference_bytes:
                raise references_too_large(max_reference_bytes, where)
            item, kind = found, found.get("type")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(
                    f"{where}.role must be user, assistant, system or developer.", f"{where}.role"
                )
            content = item.get("content")
            if isinstance(content, list):
                content = [_content_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
            messages.append({"role": role, "content": content})
        elif kind == "function_call":
            call = {
                "id": str(item.get("call_id") or item.get("id") or f"call_{i}"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)  # parallel calls: one assistant message
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": str(item.get("call_id") or ""),
                    "content": _function_output(item.get("output"), where),
                }
            )
        elif kind == "reasoning":
            continue  # Poe bots think for themselves; their reasoning is not input
        elif isinstance(kind, str) and kind in REFUSED_ITEMS:
            raise bad_request(
                f"{where}: item type {kind!r} cannot be sent through Poe: {REFUSED_ITEMS[kind]}.",
                f"{where}.type",
            )
        else:
            raise bad_request(
                f"{where}: item type {kind!r} is not supported through Poe.", f"{where}.type"
            )
    return messages


def _tools(value: object) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_request("tools must be an array.", "tools")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request(
                f"tools[{i}]: only function tools can be sent to Poe (got {kind!r}); built-in "
                "tools such as web search are Poe bots of their own.",
                f"tools[{i}].type",
            )
        out.append(
            {
                "type": "function",
                "function": {
                    k: tool[k] for k in ("name", "description", "parameters") if k in tool
                },
            }
        )
    return out


def _tool_choice(value: object) -> object:
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": value.get("name")}}
    return value


def _response_format(text: object) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):  # not silently ignored: the client meant something
        raise bad_request("text must be an object such as {'format': {'type': 'text'}}.", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request(
            "text.format must be an object: {'type': 'text' | 'json_object' | 'json_schema'}.",
            "text.format",
        )
    if fmt.get("type") == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema", {})},
        }
    return {"type": fmt.get("type")}


def chat_body(
    body: dict[str, Any],
    history: list[dict[str, Any]],
    lookup: ItemLookup | None = None,
    max_reference_bytes: int = 64 * 1024 * 1024,
) -> dict[str, Any]:
    """The chat completions body equivalent to a Responses request (after ``history``)."""
    messages = [*history, *input_to_messages(body.get("input"), lookup, max_reference_bytes)]
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request("instructions must be a string.", "instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    out: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "stream": body.get("stream", False),
        "temperature": body.get("temperature"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "tools": _tools(body.get("tools")),
        "tool_choice": _tool_choice(body.get("tool_choice")),
        "max_completion_tokens": body.get("max_output_tokens"),
        "response_format": _response_format(body.get("text")),
        "poe_parameters": body.get("poe_parameters"),
    }
    return {k: v for k, v in out.items() if v is not None}


# Chat fields the rewrite fills, by the Responses field the client sent.
_FIELD_NAMES = {
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}
_MESSAGE = re.compile(r"messages\[(\d+)\]((?:\.tool_calls\[(\d+)\](?:\.function)?)?)")


def _input_origins(items: object, lookup: ItemLookup | None = None) -> list[int]:
    """For each chat message made from ``input``, the index of the item it starts at. Found
    by converting ever longer prefixes (only when an error must be named, so the cost of
    walking prefixes is paid by bad requests alone); several items can make one message."""
    if not isinstance(items, list):
        return [0]
    origins: list[int] = []
    for j in range(len(items)):
        made = len(input_to_messages(items[: j + 1], lookup))
        origins += [j] * (made - len(origins))
    return origins


def in_request_terms(
    error: OpenAIError,
    body: dict[str, Any],
    history: list[dict[str, Any]],
    lookup: ItemLookup | None = None,
) -> OpenAIError:
    """A chat parser's error, naming the field the client sent in its Responses request:
    ``messages[i]`` becomes ``input[j]`` (or ``instructions``, or ``previous_response_id`` for
    the stored conversation), ``max_completion_tokens`` becomes ``max_output_tokens``..."""
    first_input = len(history) + (1 if body.get("instructions") is not None else 0)
    try:
        origins = _input_origins(body.get("input"), lookup)
    except OpenAIError:
        origins = []

    def rename(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if index < len(history):
            return "previous_response_id"
        if index < first_input:
            return "instructions"
        k = index - first_input
        if k >= len(origins):
            return "input"
        item = origins[k]
        if match.group(3) is not None:  # a tool call: one function_call item each
            return f"input[{item + int(match.group(3))}]"
        return f"input[{item}]"

    def translate(text: str) -> str:
        text = _MESSAGE.sub(rename, text)
        text = re.sub(r"(tools\[\d+\])\.function\b", r"\1", text)  # Responses tools are flat
        for chat_name, name in _FIELD_NAMES.items():
            text = text.replace(chat_name, name)
        return re.sub(r"\bmessages\b", "input", text)

    param = None if error.param is None else translate(error.param)
    return OpenAIError(
        error.status, translate(error.message), error.type, error.code, param, error.headers
    )


def parse_request(
    body: dict[str, Any],
    history: list[dict[str, Any]],
    model_map: ModelMap,
    file_limit: int,
    lookup: ItemLookup | None = None,
    max_reference_bytes: int = 64 * 1024 * 1024,
) -> ChatRequest:
    """Validate a Responses request through the chat parser (one validation path), with its
    errors in the client's own terms."""
    try:
        chat = chat_body(body, history, lookup, max_reference_bytes)
        return parse_chat_request(chat, model_map, file_limit)
    except OpenAIError as e:
        raise in_request_terms(e, body, history, lookup) from None


# --- the conversation store ----------------------------------------------------------------------


@dataclass
class Stored:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # chat messages through this response's output
    owner: str = ""  # who made it (service.owner_of): only they may read or continue it
    at: float = field(default_factory=time.monotonic)
    size: int = 0  # about the bytes it holds (see weight)


def weight(value: Any) -> int:
    """About the bytes a stored value holds: its strings' lengths (pictures travel as data:
    URLs), 8 for anything else. Iterative: a value of any depth."""
    total, stack = 0, [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            total += len(node)
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        else:
            total += 8
    return total


class ResponseStore:
    """Earlier responses, bounded by count, age and bytes, for ``previous_response_id`` and
    GET. The bytes bound matters: each conversation may hold a whole request body's pictures."""

    def __init__(
        self, max_entries: int = 1000, max_age_s: float = 3600, max_bytes: int = 256 * 2**20
    ) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._holders: dict[str, str] = {}  # output item id -> the response that holds it

    def put(
        self, response: dict[str, Any], conversation: list[dict[str, Any]], owner: str = ""
    ) -> None:
        self._remove(response["id"])
        size = weight(response) + weight(conversation)
        self._items[response["id"]] = Stored(response, conversation, owner, size=size)
        self.bytes += size
        for item in response.get("output") or []:
            self._holders[item["id"]] = response["id"]
        self._expire()

    def get(self, response_id: str, owner: str = "") -> Stored | None:
        """The stored response, if ``owner`` made it; another caller's is as good as unknown
        (not even its existence is told)."""
        self._expire()
        stored = self._items.get(response_id)
        if stored is None or not hmac.compare_digest(stored.owner, owner):
            return None
        return stored

    def item(self, item_id: str, owner: str = "") -> dict[str, Any] | None:
        """An output item of a stored response ``owner`` made, for ``item_reference`` input."""
        stored = self.get(self._holders.get(item_id, ""), owner)
        if stored is None:
            return None
        return next((i for i in stored.response["output"] if i["id"] == item_id), None)

    def delete(self, response_id: str, owner: str = "") -> bool:
        if self.get(response_id, owner) is None:
            return False
        self._remove(response_id)
        return True

    def _remove(self, response_id: str) -> None:
        stored = self._items.pop(response_id, None)
        if stored is not None:
            self._forget(stored)

    def _forget(self, stored: Stored) -> None:
        self.bytes -= stored.size
        for item in stored.response.get("output") or []:
            self._holders.pop(item["id"], None)

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.max_age_s
        while self._items and (
            len(self._items) > self.max_entries
            or self.bytes > self.max_bytes
            or next(iter(self._items.values())).at < cutoff
        ):
            self._forget(self._items.popitem(last=False)[1])


def unknown_response(response_id: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"No response with id '{response_id}' found (responses are kept for a "
        "limited time and number; see poe_response_store_size / poe_response_store_minutes).",
        "invalid_request_error",
        "not_found",
        "previous_response_id",
    )


# --- the answer ----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass
class _Item:
    output_index: int
    item: dict[str, Any]


class ResponseBuilder:
    """Builds one Response and, for streams, its events in the order OpenAI's spec gives."""

    def __init__(self, request: dict[str, Any], model: str, tools: list[dict[str, Any]]) -> None:
        tools = [
            {
                "type": "function",
                "name": t.get("name"),
                "description": t.get("description"),
                "parameters": t.get("parameters"),
                "strict": t.get("strict"),
            }
            for t in tools
            if isinstance(t, dict)
        ]
        self.sequence = 0
        self.response: dict[str, Any] = {
            "id": new_id("resp"),
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": request.get("instructions"),
            "max_output_tokens": request.get("max_output_tokens"),
            "model": model,
            "output": [],
            "parallel_tool_calls": request.get("parallel_tool_calls", True) is not False,
            "previous_response_id": request.get("previous_response_id"),
            "store": request.get("store", True) is not False,
            "temperature": request.get("temperature"),
            "text": request.get("text") or {"format": {"type": "text"}},
            "tool_choice": request.get("tool_choice") or "auto",
            "tools": tools,
            "top_p": request.get("top_p"),
            "truncation": "disabled",
            "metadata": request.get("metadata") or {},
        }
        self._message: _Item | None = None
        self._calls: dict[int, _Item] = {}  # tool-call index -> its output item
        self._items: list[_Item] = []

    # Events --------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _snapshot(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.response))

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self._snapshot()),
            self._event("response.in_progress", response=self._snapshot()),
        ]

    def _add(self, item: dict[str, Any]) -> tuple[_Item, dict[str, Any]]:
        entry = _Item(len(self._items), item)
        self._items.append(entry)
        added = self._event(
            "response.output_item.added",
            output_index=entry.output_index,
            item=json.loads(json.dumps(item)),
        )
        return entry, added

    def text(self, delta: str) -> list[dict[str, Any]]:
        if not delta:
            return []
        events: list[dict[str, Any]] = []
        if self._message is None:
            message = {
                "id": new_id("msg"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self._message, added = self._add(message)
            events.append(added)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            message["content"].append(part)
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=message["id"],
                    output_index=self._message.output_index,
                    content_index=0,
                    part=dict(part),
                )
            )
        message = self._message.item
        message["content"][0]["text"] += delta
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=message["id"],
                output_index=self._message.output_index,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return events

    def tool_calls(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for delta in deltas:
            fn = delta.get("function") or {}
            entry = self._calls.get(delta["index"])
            if entry is None:
                item = {
                    "id": new_id("fc"),
                    "type": "function_call",
                    "status": "in_progress",
                    "call_id": delta.get("id") or new_id("call"),
                    "name": fn.get("name") or "",
                    "arguments": "",
                }
                entry, added = self._add(item)
                self._calls[delta["index"]] = entry
                events.append(added)
            args = fn.get("arguments") or ""
            if args:
                entry.item["arguments"] += args
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=entry.item["id"],
                        output_index=entry.output_index,
                        delta=args,
                    )
                )
        return events

    def finish(self, reason: str | None, usage: dict[str, int]) -> list[dict[str, Any]]:
        """Close every item, then ``response.completed`` (or ``incomplete`` at the limit)."""
        events: list[dict[str, Any]] = []
        for entry in self._items:
            item = entry.item
            item["status"] = "completed" if reason != "length" else "incomplete"
            if item["type"] == "message":
                part = item["content"][0]
                events.append(
                    self._event(
                        "response.output_text.done",
                        item_id=item["id"],
                        output_index=entry.output_index,
                        content_index=0,
                        text=part["text"],
                        logprobs=[],
                    )
                )
                events.append(
                    self._event(
                        "response.content_part.done",
                        item_id=item["id"],
                        output_index=entry.output_index,
                        content_index=0,
                        part=dict(part),
                    )
                )
            else:
                events.append(
                    self._event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=entry.output_index,
                        name=item["name"],
                        arguments=item["arguments"],
                    )
                )
            events.append(
                self._event(
                    "response.output_item.done",
                    output_index=entry.output_index,
                    item=json.loads(json.dumps(item)),
                )
            )
        self.response["output"] = [e.item for e in self._items]
        self.response["usage"] = {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"],
        }
        if reason == "length":
            self.response["status"] = "incomplete"
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
            events.append(self._event("response.incomplete", response=self._snapshot()))
        else:
            self.response["status"] = "completed"
            events.append(self._event("response.completed", response=self._snapshot()))
        return events

    def fail(self, error: OpenAIError) -> list[dict[str, Any]]:
        """A failure after streaming began: an ``error`` event, then ``response.failed``."""
        self.response["status"] = "failed"
        self.response["output"] = [e.item for e in self._items]
        # The spec allows only its own codes here; the precise one is in the `error` event.
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        self.response["error"] = {"code": code, "message": error.message}
        return [
            self._event("error", code=error.code, message=error.message, param=error.param),
            self._event("response.failed", response=self._snapshot()),
        ]

    def conversation_tail(self) -> dict[str, Any]:
        """This response's output as a chat message, for the conversation store."""
        text = "".join(
            e.item["content"][0]["text"] for e in self._items if e.item["type"] == "message"
        )
        calls = [
            {
                "id": e.item["call_id"],
                "type": "function",
                "function": {"name": e.item["name"], "arguments": e.item["arguments"]},
            }
            for e in self._items
            if e.item["type"] == "function_call"
        ]
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = calls
        return message


def sse_event(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()
