"""Function calling: OpenAI tools <-> Poe tool definitions, tool rounds, tool-call deltas.

Pure functions and plain data only.

Encoding of a conversation with tool rounds (Poe's query has room for one round only):

* the latest round -- an assistant message with ``tool_calls`` followed by the ``tool`` messages
  answering it, at the very end of the conversation -- goes in the QueryRequest's ``tool_calls``
  and ``tool_results`` fields, exactly as fastapi-poe sends a round itself;
* every earlier round stays in the message history: the assistant's calls as a ``bot`` message
  whose text ends with ``<tool_calls>[...]</tool_calls>`` (the calls in OpenAI's JSON), and each
  result as a Poe ``tool`` message whose content is
  ``{"tool_call_id": ..., "name": ..., "content": ...}`` in JSON.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi_poe.types import (
    FunctionCallDefinition,
    FunctionDefinition,
    ParametersDefinition,
    ToolCallDefinition,
    ToolDefinition,
    ToolResultDefinition,
)

from addon.bounds import MAX_NODES, check_bounds, too_big
from addon.errors import bad_request

MAX_REF_DEPTH = 8
# OpenAI's bound. Each tool becomes a pydantic model on the event loop every stream shares:
# 100,000 tools (10 MB) took 7 s to parse, stalling every other client meanwhile.
MAX_TOOLS = 128


def _inline_refs(params: dict[str, Any], defs: dict[str, Any], param: str) -> Any:
    """Replace local ``$ref``s into ``$defs``/``definitions`` with the schema they name:
    Poe's tool definition keeps only type/properties/required, so the defs would be lost.
    Counts what it builds: a few defs that each name the next many times would otherwise
    multiply into billions of values before any check could see them."""
    built = 0

    def inline(node: Any, depth: int) -> Any:
        nonlocal built
        built += 1
        if built > MAX_NODES:
            raise too_big(param)
        if isinstance(node, list):
            return [inline(item, depth) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and depth < MAX_REF_DEPTH:
            name = ref.rsplit("/", 1)[-1]
            if ref.startswith(("#/$defs/", "#/definitions/")) and name in defs:
                merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
                return inline(merged, depth + 1)
        return {k: inline(v, depth) for k, v in node.items()}

    return inline(params, 0)


def _object(value: object, param: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be an object.", param)
    return value


def parse_tools(tools: object, tool_choice: object) -> list[ToolDefinition] | None:
    """OpenAI ``tools`` (+ ``tool_choice``) as Poe tool definitions; None when none apply."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad_request("tools must be an array of tool objects.", "tools")
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"tools takes at most {MAX_TOOLS} tools.", "tools")
    out: list[ToolDefinition] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(
                f"{where}: only tools of type 'function' can be sent to Poe.", f"{where}.type"
            )
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"{where}.function.name is required.", f"{where}.function.name")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise bad_request(
                f"{where}.function.parameters must be a JSON Schema object.",
                f"{where}.function.parameters",
            )
        check_bounds(params, f"{where}.function.parameters")
        defs = {
            **_object(params.get("definitions"), f"{where}.function.parameters.definitions"),
            **_object(params.get("$defs"), f"{where}.function.parameters.$defs"),
        }
        params = _inline_refs(params, defs, f"{where}.function.parameters")
        check_bounds(params, f"{where}.function.parameters")  # deeper with the $refs inlined
        properties = _object(params.get("properties"), f"{where}.function.parameters.properties")
        required = params.get("required")
        out.append(
            ToolDefinition(
                type="function",
                function=FunctionDefinition(
                    name=fn["name"],
                    # Poe requires a description; an empty one says nothing false.
                    description=str(fn.get("description") or ""),
                    parameters=ParametersDefinition(
                        type=str(params.get("type") or "object"),
                        properties=properties,
                        required=list(required) if isinstance(required, list) else None,
                    ),
                ),
            )
        )
    if not out:
        return None
    if tool_choice in (None, "auto", "required"):
        return out
    if tool_choice == "none":
        return None  # the model may not call tools: do not offer any
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        chosen = [t for t in out if t.function.name == name]
        if not chosen:
            raise bad_request(
                f"tool_choice names a function ({name!r}) that is not in tools.", "tool_choice"
            )
        return chosen  # Poe cannot be forced to call it; offering only it comes closest
    raise bad_request(
        "tool_choice must be 'none', 'auto', 'required' or a function choice.", "tool_choice"
    )


def parse_tool_calls(calls: object, where: str) -> list[ToolCallDefinition]:
    if not isinstance(calls, list):
        raise bad_request(f"{where} must be an array.", where)
    out: list[ToolCallDefinition] = []
    for i, call in enumerate(calls):
        here = f"{where}[{i}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{here}.function.name is required.", f"{here}.function.name")
        arguments = fn.get("arguments", "")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        out.append(
            ToolCallDefinition(
                id=str(call.get("id") or f"call_{i}"),
                type="function",
                function=FunctionCallDefinition(name=fn["name"], arguments=arguments),
            )
        )
    return out


def calls_as_text(text: str, calls: list[ToolCallDefinition]) -> str:
    """An earlier round's calls, kept in the bot message's text."""
    encoded = json.dumps([c.model_dump() for c in calls], ensure_ascii=False)
    block = f"<tool_calls>{encoded}</tool_calls>"
    return f"{text}\n{block}" if text else block


def result_as_text(call_id: str, name: str, content: str) -> str:
    return json.dumps(
        {"tool_call_id": call_id, "name": name, "content": content}, ensure_ascii=False
    )


def tool_result(call_id: str, name: str, content: str) -> ToolResultDefinition:
    return ToolResultDefinition(role="tool", tool_call_id=call_id, name=name, content=content)


# --- tool calls coming back from Poe ---------------------------------------------------------


@dataclass
class _Call:
    index: int  # dense index, in order of first appearance
    id: str
    name: str | None
    arguments: str = ""
    announced: bool = False  # has the client seen its first delta (id, type, name)?
    pending: str = ""  # arguments received before the name was known


@dataclass
class ToolCallAssembler:
    """Turns Poe's OpenAI-shaped tool-call chunks into deltas a client can rely on.

    Poe's chunks are passed through but normalised: indexes from 0 without gaps, the first delta
    of each call carries id, type and function.name, every delta a ``function`` object. With
    ``parallel`` false only the first call is kept: later ones are never recorded.
    """

    parallel: bool = True
    calls: dict[int, _Call] = field(default_factory=dict)  # Poe's index -> call

    def feed(self, chunk: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        """(content text, tool-call deltas) carried by one Poe ``json`` event."""
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return "", []
        delta = choices[0].get("delta")
        if not isinstance(delta, dict):
            return "", []
        text = delta.get("content") if isinstance(delta.get("content"), str) else ""
        out: list[dict[str, Any]] = []
        for raw in delta.get("tool_calls") or []:
            if isinstance(raw, dict):
                out.extend(self._feed_call(raw))
        return text or "", out

    def _feed_call(self, raw: dict[str, Any]) -> list[dict[str, Any]]:
        poe_index = raw.get("index", len(self.calls))
        fn = raw.get("function") if isinstance(raw.get("function"), dict) else {}
        args = fn.get("arguments") if isinstance(fn.get("arguments"), str) else ""
        call = self.calls.get(poe_index)
        if call is None:
            if not self.parallel and self.calls:
                return []  # parallel_tool_calls=false: only the first call
            call = _Call(
                index=len(self.calls),
                id=str(raw.get("id") or "call_" + secrets.token_hex(12)),
                name=fn.get("name") if isinstance(fn.get("name"), str) else None,
            )
            self.calls[poe_index] = call
        elif call.name is None and isinstance(fn.get("name"), str):
            call.name = fn["name"]
        call.arguments += args
        if call.name is None:
            call.pending += args  # announce once the name is known
            return []
        if not call.announced:
            call.announced = True
            first_args, call.pending = call.pending + args, ""
            return [
                {
                    "index": call.index,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": first_args},
                }
            ]
        return [{"index": call.index, "function": {"arguments": args}}]

    def merged(self) -> list[dict[str, Any]]:
        """The calls as a non-streamed ``message.tool_calls``."""
        return [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in sorted(self.calls.values(), key=lambda c: c.index)
            if c.name is not None
        ]
