"""Structured output requests in both dialects, turned into one compiled grammar:
OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema":
{"name", "schema", "strict"}}) and TGI's grammar object ({"type": "json" | "json_object" |
"json_schema" | "regex", "value": ...}, also TGI's native `parameters.grammar`). `lark` is our
extension for a full context-free grammar."""

from __future__ import annotations

from sagellm.api.context import ServingContext
from sagellm.api.error_shapes import invalid

_KINDS = "text, json_object, json_schema, json, regex, lark"


def grammar_for(ctx: ServingContext, fmt, param: str):
    """The compiled grammar a response_format / grammar object asks for; None for plain text."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise invalid(f'`{param}` must be an object like {{"type": "json_object"}}; types: {_KINDS}', param)
    kind = fmt["type"]
    if kind == "text":
        return None
    if not ctx.engine.supports_grammar:
        raise invalid(f"`{param}`: grammar is not supported (DISABLE_GRAMMAR_SUPPORT is set)", param)
    value = fmt.get("value")
    if kind == "json_schema":
        spec = fmt.get("json_schema", value)
        if isinstance(spec, dict) and "schema" in spec:
            spec = spec["schema"]
        if spec is None:
            raise invalid(f'`{param}` of type json_schema needs "json_schema": {{"name": ..., "schema": {{...}}}}',
                           param)
        return ctx.engine.compile_grammar("json_schema", spec, param)
    if kind in ("json", "json_object"):
        if value is None:
            if kind == "json":
                raise invalid(f'`{param}` of type json needs "value": a JSON schema', param)
            return ctx.engine.compile_grammar("json_object", None, param)
        return ctx.engine.compile_grammar("json_schema", value, param)
    if kind in ("regex", "lark"):
        if not isinstance(value, str) or not value:
            raise invalid(f'`{param}` of type {kind} needs "value": a non-empty string', param)
        return ctx.engine.compile_grammar(kind, value, param)
    raise invalid(f"`{param}` type must be one of {_KINDS}. Given: {kind!r}", param)
