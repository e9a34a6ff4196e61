"""Bounds on the JSON a client sends that travels on to Poe as structure (tool schemas, bot
parameters): Poe's client (pydantic) refuses to serialise beyond a fixed depth, and inlined
``$ref``s could multiply a small schema without end. Pure functions."""

from __future__ import annotations

from typing import Any

from addon.errors import OpenAIError, bad_request

MAX_DEPTH = 64  # levels of objects and arrays; real tool schemas use fewer than ten
MAX_NODES = 20_000  # values in one tool schema after $refs are inlined


def check_bounds(value: Any, param: str) -> None:
    """400 when ``value`` nests deeper than MAX_DEPTH or holds more than MAX_NODES values.
    Iterative, so a value of any depth is measured without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise too_big(param)
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > MAX_DEPTH:
            raise too_deep(param)
        stack.extend((child, depth + 1) for child in children)


def too_deep(param: str | None = None) -> OpenAIError:
    """``param`` (None: the whole request body) nests deeper than this proxy or Poe takes."""
    if param is None:  # too deep for Python's parser or for a walk over the body
        return bad_request("The request body nests objects or arrays too deeply.")
    return bad_request(f"{param} nests objects or arrays too deeply (over {MAX_DEPTH}).", param)


def too_big(param: str) -> OpenAIError:
    return bad_request(f"{param} is too large (over {MAX_NODES} values).", param)
