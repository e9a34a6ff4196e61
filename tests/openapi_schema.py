"""Validate JSON instances against OpenAI's published OpenAPI schemas.

The description lives in ``<repo>/../shared/openai-openapi/openapi.json`` (override with the
``OPENAI_OPENAPI_JSON`` environment variable). Usage::

    from openapi_schema import validate
    validate(body, "CreateChatCompletionResponse")   # raises jsonschema.ValidationError

OpenAPI 3.1 is JSON Schema 2020-12 plus a few leftovers; the one that matters is
``nullable: true`` (an OpenAPI 3.0 keyword that 2020-12 ignores, which would reject ``null``
for e.g. ``finish_reason`` in stream chunks or ``usage`` declared as ``$ref`` +
``nullable``). Every schema carrying ``nullable: true`` is rewritten once into
``{"anyOf": [<schema without nullable>, {"type": "null"}]}`` before validating.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

__all__ = ["DOCUMENT_URI", "load_document", "spec_path", "validate", "validator_for"]

DOCUMENT_URI = "urn:openai:openapi.json"
ENV_VAR = "OPENAI_OPENAPI_JSON"

# Keywords whose value maps *names* to subschemas (so the keys are not keywords).
_NAMED_SUBSCHEMAS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "schemas"}
)
# Keywords whose value is data, never a schema: leave untouched.
_DATA_KEYWORDS = frozenset({"example", "examples", "default", "const", "enum", "discriminator"})


def spec_path() -> Path:
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override)
    shared = Path(__file__).resolve().parents[2] / "shared" / "openai-openapi" / "openapi.json"
    if shared.is_file():
        return shared
    # A clone without ../shared: the subset of the same description kept in the repository.
    return Path(__file__).resolve().parent / "openapi" / "openai-schemas.json"


def _rewrite_nullable(node: Any) -> Any:
    """Return a copy of ``node`` with OpenAPI ``nullable`` turned into JSON Schema."""
    if isinstance(node, list):
        return [_rewrite_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DATA_KEYWORDS or key.startswith("x-"):
            out[key] = value
        elif key in _NAMED_SUBSCHEMAS and isinstance(value, dict):
            out[key] = {name: _rewrite_nullable(sub) for name, sub in value.items()}
        else:
            out[key] = _rewrite_nullable(value)
    nullable = out.pop("nullable", None)
    if nullable is True:
        # The whole original schema (including any "$ref" and its siblings) becomes the
        # first branch, so "$ref"+"nullable" means "the referenced schema, or null".
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def load_document() -> dict[str, Any]:
    """The whole OpenAPI document, with ``nullable`` rewritten (loaded once)."""
    path = spec_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"OpenAI OpenAPI description not found at {path} (set {ENV_VAR} to override)"
        ) from None
    doc: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "components" and isinstance(value, dict):
            doc[key] = {
                section: (
                    {name: _rewrite_nullable(s) for name, s in schemas.items()}
                    if isinstance(schemas, dict)
                    else schemas
                )
                for section, schemas in value.items()
            }
        else:
            doc[key] = _rewrite_nullable(value) if key in ("paths", "webhooks") else value
    return doc


@functools.cache
def _registry() -> Registry[Any]:
    resource: Resource[Any] = Resource.from_contents(
        load_document(), default_specification=referencing.jsonschema.DRAFT202012
    )
    return Registry().with_resource(DOCUMENT_URI, resource).crawl()


@functools.cache
def validator_for(schema_name: str) -> jsonschema.Draft202012Validator:
    schemas = load_document().get("components", {}).get("schemas", {})
    if schema_name not in schemas:
        close = sorted(n for n in schemas if schema_name.lower() in n.lower())[:10]
        raise KeyError(f"no schema {schema_name!r} in components/schemas; similar: {close}")
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": f"{DOCUMENT_URI}#/components/schemas/{schema_name}",
    }
    return jsonschema.Draft202012Validator(schema, registry=_registry())


def _json_path(path: Any) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _short(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate(instance: object, schema_name: str) -> None:
    """Validate ``instance`` against ``#/components/schemas/<schema_name>``.

    Raises ``jsonschema.ValidationError`` whose message names the schema, the JSON path of
    the most relevant failure, the offending value, and a few of the other failures.
    """
    validator = validator_for(schema_name)
    errors = list(validator.iter_errors(instance))
    if not errors:
        return
    best = best_match(errors)
    assert best is not None
    lines = [
        f"{schema_name}: {_json_path(best.absolute_path)}: {best.message}",
        f"  value: {_short(best.instance)}",
        f"  schema path: {'/'.join(str(p) for p in best.absolute_schema_path)}",
    ]
    if best.context:  # anyOf/oneOf: say why each alternative failed
        lines.append("  alternatives:")
        for err in sorted(best.context, key=lambda e: list(map(str, e.relative_schema_path)))[:8]:
            branch = err.relative_schema_path[0] if err.relative_schema_path else "?"
            where = _json_path(err.absolute_path)
            lines.append(f"    [{branch}] {where}: {_short(err.message, 160)}")
    ancestors: set[int] = set()
    node: jsonschema.ValidationError | None = best
    while node is not None:
        ancestors.add(id(node))
        node = node.parent
    others = [e for e in errors if id(e) not in ancestors]
    if others:
        lines.append(f"  {len(others)} other error(s):")
        for err in others[:5]:
            lines.append(f"    {_json_path(err.absolute_path)}: {_short(err.message, 160)}")
    raise jsonschema.ValidationError(
        "\n".join(lines),
        path=best.absolute_path,
        schema_path=best.absolute_schema_path,
        cause=best.cause,
        context=errors,
    )
