"""Regenerate openai-schemas.json: the part of OpenAI's OpenAPI description the tests validate
against, so that a clone without ../shared/openai-openapi can still run the suite.

    python tests/openapi/extract.py ../shared/openai-openapi/openapi.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    "CreateCompletionResponse",
    "ImagesResponse",
    "Response",
    "ResponseStreamEvent",
    "DeleteModelResponse",
]


def refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for value in node.values():
            found |= refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= refs(value)
    return found


def main(source: str) -> None:
    spec = json.loads(Path(source).read_text())
    schemas = spec["components"]["schemas"]
    keep: set[str] = set()
    todo = [r for r in ROOTS if r in schemas]
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        todo.extend(refs(schemas[name]) - keep)
    out = {
        "openapi": spec["openapi"],
        "info": {
            **spec["info"],
            "x-subset-of": "components/schemas reachable from " + ", ".join(ROOTS),
        },
        "components": {"schemas": {k: schemas[k] for k in sorted(keep)}},
    }
    target = Path(__file__).with_name("openai-schemas.json")
    target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(keep)} schemas -> {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/openai-openapi/openapi.json")
