"""What bench/grammar_compare.py measures with: the run's sizes, and the grammars, schemas and
JSON-schema feature cases put to every library."""

from __future__ import annotations

import json
import os
from typing import Any

DEFAULT_TOKENIZER = os.path.expanduser("~/.cache/sagellm/smollm2-135m-instruct")
LIBS = ("llguidance", "xgrammar", "outlines-core")
BATCH = 16
WALK_REPS = 20  # timed repetitions of the token-by-token walk
MATCHERS_FOR_MEMORY = 1000
STARTUP_TIMEOUT_S = (
    120  # worker start: imports, HF tokenizer load, library tokenizer setup
)


PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
        "tags": {
            "type": "array",
            "items": {"type": "string"},
            "minItems": 1,
            "maxItems": 4,
        },
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}

PERSON_INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "editor",
    "address": {"street": "12 St James's Square", "zip": "10001"},
    "tags": ["math", "engines", "poetry"],
}


def _function(name: str, params: dict, required: list[str]) -> dict:
    return {
        "type": "object",
        "properties": {
            "name": {"const": name},
            "arguments": {
                "type": "object",
                "properties": params,
                "required": required,
                "additionalProperties": False,
            },
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


TOOL_SCHEMA = {
    "$defs": {
        "get_weather": _function(
            "get_weather",
            {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            ["city"],
        ),
        "search_docs": _function(
            "search_docs",
            {
                "query": {"type": "string"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 50},
            },
            ["query", "limit"],
        ),
    },
    "oneOf": [{"$ref": "#/$defs/get_weather"}, {"$ref": "#/$defs/search_docs"}],
}

TOOL_SCHEMA_ANYOF = {"$defs": TOOL_SCHEMA["$defs"], "anyOf": TOOL_SCHEMA["oneOf"]}

REGEX = r"(yes|no|maybe)( because [a-z ]{1,40})?"

LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""

# name -> (kind, spec, a valid sample text)
GRAMMARS: dict[str, tuple[str, Any, str]] = {
    "a) nested schema": ("schema", PERSON_SCHEMA, json.dumps(PERSON_INSTANCE)),
    "b) json_object": (
        "json_object",
        None,
        json.dumps({"k": [1, 2.5, {"x": None}], "ok": True}),
    ),
    "c) regex": ("regex", REGEX, "maybe because it is late"),
    "d) tool-call oneOf+$ref": (
        "schema",
        TOOL_SCHEMA,
        json.dumps(
            {"name": "search_docs", "arguments": {"query": "bitmask", "limit": 5}}
        ),
    ),
    "d2) same tool-call with anyOf": (
        "schema",
        TOOL_SCHEMA_ANYOF,
        json.dumps(
            {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
        ),
    ),
    "e) lark (arith)": ("lark", LARK, "(12+3)-45"),
}

# Feature coverage: name -> (schema, valid instance, instance violating the feature).
_TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["value", "children"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}


def _tree(depth: int) -> dict:
    return {"value": depth, "children": [_tree(depth - 1)] if depth > 1 else []}


_POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
    "required": ["x", "y"],
    "additionalProperties": False,
}

FEATURES: dict[str, tuple[dict, Any, Any]] = {
    "nested objects": (
        {
            "type": "object",
            "properties": {
                "a": {
                    "type": "object",
                    "properties": {
                        "b": {
                            "type": "object",
                            "properties": {"c": {"type": "integer"}},
                            "required": ["c"],
                        }
                    },
                    "required": ["b"],
                }
            },
            "required": ["a"],
        },
        {"a": {"b": {"c": 1}}},
        {"a": {"b": {"c": "x"}}},
    ),
    "array minItems/maxItems": (
        {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
        [1, 2],
        [1, 2, 3, 4],
    ),
    "enum": ({"type": "string", "enum": ["red", "green", "blue"]}, "green", "pink"),
    "const": ({"const": "fixed"}, "fixed", "other"),
    "anyOf": (
        {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
        "ab",
        True,
    ),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    "allOf": (
        {
            "allOf": [
                {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}},
                    "required": ["a"],
                },
                {
                    "type": "object",
                    "properties": {"b": {"type": "string"}},
                    "required": ["b"],
                },
            ]
        },
        {"a": 1, "b": "x"},
        {"a": 1},
    ),
    "$ref/$defs": (
        {
            "$defs": {"pt": _POINT},
            "type": "object",
            "properties": {
                "start": {"$ref": "#/$defs/pt"},
                "end": {"$ref": "#/$defs/pt"},
            },
            "required": ["start", "end"],
            "additionalProperties": False,
        },
        {"start": {"x": 0, "y": 1}, "end": {"x": 2, "y": 3}},
        {"start": {"x": 0}, "end": {"x": 2, "y": 3}},
    ),
    "recursive $ref (tree, depth 5)": (
        _TREE,
        _tree(5),
        {"value": 1, "children": [{"children": []}]},
    ),
    "pattern": (
        {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "ABC-12",
        "abc-12",
    ),
    "format date-time": (
        {"type": "string", "format": "date-time"},
        "2024-05-01T12:30:00Z",
        "yesterday",
    ),
    "format email": (
        {"type": "string", "format": "email"},
        "ada.l@example.com",
        "not-an-email",
    ),
    "minLength/maxLength": (
        {"type": "string", "minLength": 2, "maxLength": 5},
        "abc",
        "abcdefg",
    ),
    "integer minimum/maximum": (
        {"type": "integer", "minimum": 10, "maximum": 20},
        15,
        25,
    ),
    "number exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 0.5, -1),
    "additionalProperties false": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "additionalProperties": False,
        },
        {"a": 1},
        {"a": 1, "z": 2},
    ),
    "additionalProperties schema": (
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"x": 1, "y": 2},
        {"x": "s"},
    ),
    "patternProperties": (
        {
            "type": "object",
            "patternProperties": {"^x_": {"type": "integer"}},
            "additionalProperties": False,
        },
        {"x_a": 1},
        {"y": 1},
    ),
    'nullable type ["string","null"]': ({"type": ["string", "null"]}, None, 1),
    "uniqueItems": (
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        [1, 2],
        [1, 1],
    ),
    "not": ({"not": {"type": "string"}}, 1, "s"),
}

INVALID_SCHEMAS: dict[str, dict] = {
    'type "nosuchtype"': {"type": "nosuchtype"},
    "bad pattern regex": {"type": "string", "pattern": "([a-z"},
    "dangling $ref": {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/missing"}},
    },
    "minItems > maxItems": {"type": "array", "minItems": 3, "maxItems": 1},
}


class CompileError(Exception):
    """A grammar/schema the library refused (as opposed to a bug in this script)."""


def first_line(exc: BaseException | str, limit: int = 150) -> str:
    """The start of an error message, on one line (continuation lines joined with ' / ')."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = " / ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
