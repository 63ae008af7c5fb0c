"""sagellm/api/tools.py: tool_choice resolution, the reply schema, and reading replies whole and
streamed, split at every possible point."""

from __future__ import annotations

import json

import jsonschema
import pytest

from sagellm.api.tools import CallStreamer, parse_calls, plan_tools, scan_calls
from sagellm.errors import ToolError

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}}}}
TWO_CALLS = '[{"name": "get_weather", "arguments": {"city": "Paris \\"Île\\" [1]"}}, {"name": "get_time", "arguments": {}}]'


def test_choices_resolve_as_openai_documents():
    assert plan_tools([WEATHER], "none", None) is None
    assert plan_tools(None, None, None) is None
    auto = plan_tools([WEATHER, TIME], None, None)
    assert auto.allow_text and auto.parallel and [f.name for f in auto.candidates] == ["get_weather", "get_time"]
    required = plan_tools([WEATHER, TIME], "required", False)
    assert not required.allow_text and not required.parallel
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, None)
    assert [f.name for f in named.candidates] == ["get_time"] and not named.allow_text
    assert [f.name for f in plan_tools([WEATHER, TIME], "get_time", None).candidates] == ["get_time"]


@pytest.mark.parametrize("tools, choice, field, words", [
    ([WEATHER], "get_stock", "tool_choice", "Tool with name 'get_stock' not found"),
    (None, "auto", "tool_choice", "`tool_choice` needs `tools`"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools", "tools[0].function.name"),
    ([WEATHER, WEATHER], None, "tools", "two tools are named 'get_weather'"),
    ([{"type": "retrieval"}], None, "tools", "tools[0] must be"),
])
def test_bad_tools_name_the_field(tools, choice, field, words):
    with pytest.raises(ToolError) as err:
        plan_tools(tools, choice, None)
    assert err.value.param == field and words in err.value.message and err.value.status == 422


def test_reply_schema_accepts_calls_and_the_decline_only():
    schema = plan_tools([WEATHER, TIME], "auto", None).schema()
    jsonschema.validate(json.loads(TWO_CALLS), schema)
    jsonschema.validate([{"name": "no_tool", "arguments": {}}], schema)
    for bad in ([{"name": "get_weather", "arguments": {}}],  # missing required city
                [{"name": "get_weather", "arguments": {"city": "x", "extra": 1}}],  # undeclared key
                [{"name": "no_tool", "arguments": {}}, {"name": "get_time", "arguments": {}}],
                []):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = plan_tools([WEATHER, TIME], "required", False).schema()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(TWO_CALLS), single)


def test_a_user_function_named_no_tool_keeps_its_name():
    plan = plan_tools([{"type": "function", "function": {"name": "no_tool"}}], None, None)
    assert plan.no_tool == "_no_tool"


def test_parse_whole_reply():
    assert parse_calls(TWO_CALLS) == [("get_weather", '{"city": "Paris \\"Île\\" [1]"}'), ("get_time", "{}")]
    assert parse_calls(TWO_CALLS[:-5]) is None  # cut by max_tokens
    assert parse_calls("Hello") is None


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_streamed_deltas_rebuild_the_calls_at_any_split(step):
    streamer, deltas = CallStreamer(), []
    for i in range(0, len(TWO_CALLS), step):
        deltas.extend(streamer.feed(TWO_CALLS[i:i + step])[0])
    heads = [d for d in deltas if "id" in d]
    assert [(h["index"], h["function"]["name"]) for h in heads] == [(0, "get_weather"), (1, "get_time")]
    assert all(h["id"].startswith("call_") and h["type"] == "function" for h in heads)
    for index, (_, args) in enumerate(parse_calls(TWO_CALLS)):
        streamed = "".join(d["function"]["arguments"] for d in deltas if d["index"] == index)
        assert streamed == args and json.loads(streamed) is not None


def test_scan_stops_at_an_unfinished_name():
    calls = scan_calls('[{"name": "get_wea')
    assert len(calls) == 1 and calls[0].name is None
