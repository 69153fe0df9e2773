"""Structured output: what a ticket's sampling map commits to when the customer asks for JSON (OpenAI's
``response_format``), and the JSON-schema subset whose every keyword the provider's grammar enforces.

    {"type": "json_object"}                  any JSON object
    {"type": "json_schema", "schema": str}   JSON valid against the schema, given as its JSON text

The schema text is the customer's schema re-serialised compactly, keys in the order received (property order is the
order the model writes them in): ``json.dumps(schema, separators=(",", ":"), ensure_ascii=False)``; `llorch ledger
replay` rebuilds it from the request body the same way. A schema may use only the keywords llama.cpp's
JSON-schema-to-grammar converter enforces, plus annotations that do not constrain (title, description, ...): any
other keyword (``minimum``, ``multipleOf``, ``uniqueItems``, ``not``, ...) would be silently unenforced, so it is
refused, naming it and where it is. No I/O here.
"""

from __future__ import annotations

import json
import re

from llorch.ledger.objects import RESPONSE_FORMAT_SCHEMA_CHARS_MAX as SCHEMA_TEXT_CHARS_MAX

JSON_OBJECT = "json_object"
JSON_SCHEMA = "json_schema"
SCHEMA_DEPTH_MAX = 32
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
            "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern",
            "minLength", "maxLength", "format"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly"}
TYPES = {"string", "number", "integer", "boolean", "null", "object", "array"}
FORMATS = {"date", "time", "date-time", "uuid"}
SCHEMA_MAPS = {"properties", "$defs", "definitions"}       # name → schema
SCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems"}  # [schema, ...]


class SchemaRefused(ValueError):
    """A response_format this gateway cannot enforce; the message names the keyword and its path."""


def response_format_entry(response_format: object) -> dict | None:
    """The sampling map's ``response_format`` for an OpenAI ``response_format`` value (None: plain text).
    SchemaRefused names what cannot be enforced."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise SchemaRefused("response_format must be an object with a type")
    kind = response_format["type"]
    if kind == "text" and set(response_format) == {"type"}:
        return None
    if kind == JSON_OBJECT and set(response_format) == {"type"}:
        return {"type": JSON_OBJECT}
    if kind != JSON_SCHEMA:
        raise SchemaRefused(f"response_format.type {kind[:32]!r} is not served (text, json_object, json_schema)")
    spec = response_format.get("json_schema")
    if set(response_format) != {"type", "json_schema"} or not isinstance(spec, dict):
        raise SchemaRefused("response_format json_schema needs exactly a json_schema object")
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise SchemaRefused(f"response_format.json_schema has unknown keys {sorted(unknown)}")
    if not isinstance(spec.get("name"), str) or not NAME.fullmatch(spec["name"]):
        raise SchemaRefused("response_format.json_schema.name must be 1-64 of A-Z a-z 0-9 _ -")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise SchemaRefused("response_format.json_schema.strict must be a boolean")
    if not isinstance(spec.get("description", ""), str) or len(spec.get("description", "")) > 4096:
        raise SchemaRefused("response_format.json_schema.description must be a string of at most 4096 characters")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise SchemaRefused("response_format.json_schema.schema must be a JSON schema object")
    check_schema(schema, "response_format.json_schema.schema", 0)
    text = schema_text(schema)
    if len(text) > SCHEMA_TEXT_CHARS_MAX:
        raise SchemaRefused(f"response_format.json_schema.schema is {len(text)} characters as JSON; at most "
                            f"{SCHEMA_TEXT_CHARS_MAX}")
    return {"type": JSON_SCHEMA, "schema": text}


def schema_text(schema: dict) -> str:
    """The schema as the sampling map commits to it (see the module docstring)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def check_schema(schema: object, where: str, depth: int) -> None:
    """Refuse a keyword the grammar would not enforce (SchemaRefused naming it and its path)."""
    if depth > SCHEMA_DEPTH_MAX:
        raise SchemaRefused(f"{where}: the schema nests deeper than {SCHEMA_DEPTH_MAX}")
    if isinstance(schema, bool):
        raise SchemaRefused(f"{where}: a boolean schema is not served; use an object")
    if not isinstance(schema, dict):
        raise SchemaRefused(f"{where}: a schema must be an object")
    for keyword, value in schema.items():
        here = f"{where}.{keyword}"
        if keyword in ANNOTATIONS:
            continue
        if keyword not in ENFORCED:
            raise SchemaRefused(f"{here}: the keyword {keyword!r} is not enforced by llama.cpp's grammar, so it is "
                                f"not accepted (served: {', '.join(sorted(ENFORCED))})")
        if keyword in SCHEMA_MAPS:
            if not isinstance(value, dict):
                raise SchemaRefused(f"{here} must be an object of schemas")
            for name, child in value.items():
                check_schema(child, f"{here}.{name}", depth + 1)
        elif keyword in SCHEMA_LISTS:
            if not isinstance(value, list) or not value:
                raise SchemaRefused(f"{here} must be a non-empty list of schemas")
            for number, child in enumerate(value):
                check_schema(child, f"{here}[{number}]", depth + 1)
        elif keyword == "items" or (keyword == "additionalProperties" and not isinstance(value, bool)):
            check_schema(value, here, depth + 1)
        elif keyword == "type":
            types = value if isinstance(value, list) else [value]
            if not types or not all(isinstance(t, str) and t in TYPES for t in types):
                raise SchemaRefused(f"{here} must be one of {sorted(TYPES)} (or a list of them)")
        elif keyword == "format" and value not in FORMATS:
            raise SchemaRefused(f"{here}: the format {str(value)[:32]!r} is not enforced (served: "
                                f"{', '.join(sorted(FORMATS))})")
        elif keyword == "$ref" and not (isinstance(value, str) and value.startswith("#/")):
            raise SchemaRefused(f"{here}: only local references (#/$defs/...) are served")
        elif keyword == "required" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise SchemaRefused(f"{here} must be a list of property names")
        elif keyword in ("minItems", "maxItems", "minLength", "maxLength") and \
                not (type(value) is int and 0 <= value <= 100_000):
            raise SchemaRefused(f"{here} must be an integer 0..100000")
        elif keyword == "pattern" and not isinstance(value, str):
            raise SchemaRefused(f"{here} must be a string")
