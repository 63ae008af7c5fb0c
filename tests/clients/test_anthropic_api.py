"""Anthropic's Messages API with the real `anthropic` client against the real server and model:
create, stream (the event sequence), stop reasons, tool use with a round trip, count_tokens and
errors in Anthropic's shape. Greedy answers equal the chat completions route's: one engine path."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest
import requests

WEATHER = {"name": "get_weather", "description": "The current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
# anthropic 2.x no longer takes temperature as an argument; the API still does.
GREEDY = {"temperature": 0}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(engine_server):
    """This suite runs on both engines (conftest.engine_server): ours, then vLLM."""
    return engine_server


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="x", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=300, max_retries=0)


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_create_equals_chat_completions(claude, oai):
    msg = claude.messages.create(model="x", max_tokens=12, extra_body=GREEDY, system="You are terse.",
                                 messages=[{"role": "user", "content": "Name a colour."}])
    chat = oai.chat.completions.create(model="x", max_tokens=12, extra_body=GREEDY, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}])
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert text_of(msg) == chat.choices[0].message.content
    assert msg.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[chat.choices[0].finish_reason]
    assert msg.usage.input_tokens == chat.usage.prompt_tokens
    assert msg.usage.output_tokens == chat.usage.completion_tokens
    count = claude.messages.count_tokens(model="x", system="You are terse.",
                                         messages=[{"role": "user", "content": "Name a colour."}])
    assert count.input_tokens == msg.usage.input_tokens


def test_max_tokens_and_stop_sequences(claude):
    ask = [{"role": "user", "content": [{"type": "text", "text": "Write a long story about a dragon."}]}]
    cut = claude.messages.create(model="x", max_tokens=12, extra_body=GREEDY, messages=ask)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 12 and cut.stop_sequence is None
    text = text_of(cut)
    word = text.split()[2]
    stopped = claude.messages.create(model="x", max_tokens=12, extra_body=GREEDY, messages=ask, stop_sequences=[word])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert text_of(stopped) == text[:text.index(word)]


def test_stream_events_equal_create(claude):
    args = dict(model="x", max_tokens=16, extra_body=GREEDY, messages=[{"role": "user", "content": "Say hi."}])
    whole = claude.messages.create(**args)
    events = list(claude.messages.create(stream=True, **args))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert events[-2].delta.stop_reason == whole.stop_reason and events[-2].usage.output_tokens == whole.usage.output_tokens
    with claude.messages.stream(**args) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text_of(final) == text_of(whole) and final.stop_reason == whole.stop_reason


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_tool_use_round_trip(claude, oai, choice):
    msg = claude.messages.create(model="x", max_tokens=60, extra_body=GREEDY, messages=ASK, tools=[WEATHER],
                                 tool_choice=choice)
    assert msg.stop_reason == "tool_use"
    (use,) = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER["input_schema"])
    follow = ASK + [{"role": "assistant", "content": msg.content},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                  "content": "22 degrees and sunny"}]}]
    answer = claude.messages.create(model="x", max_tokens=16, extra_body=GREEDY, messages=follow, tools=[WEATHER],
                                    tool_choice={"type": "none"})
    assert answer.stop_reason in ("end_turn", "max_tokens") and text_of(answer)
    # The same conversation in chat completions' words: the same prompt and answer.
    call = {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}
    chat = oai.chat.completions.create(model="x", max_tokens=16, temperature=0, tool_choice="none", messages=ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": use.id, "content": "22 degrees and sunny"}], tools=[
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]}}])
    assert text_of(answer) == chat.choices[0].message.content
    assert answer.usage.input_tokens == chat.usage.prompt_tokens


def test_streamed_tool_use_equals_create(claude):
    args = dict(model="x", max_tokens=60, extra_body=GREEDY, messages=ASK, tools=[WEATHER], tool_choice={"type": "any"})
    whole = claude.messages.create(**args)
    events = list(claude.messages.create(stream=True, **args))
    deltas = [e.delta.partial_json for e in events if e.type == "content_block_delta"]
    assert deltas and all(e.delta.type == "input_json_delta" for e in events if e.type == "content_block_delta")
    with claude.messages.stream(**args) as stream:
        final = stream.get_final_message()
    assert final.content[0].input == whole.content[0].input and final.stop_reason == "tool_use"


def test_errors_are_anthropic_shaped(server, claude):
    r = requests.post(server.url + "/v1/messages", json={"messages": ASK}, timeout=60)
    body = r.json()
    assert r.status_code == 422 and body["type"] == "error" and "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model="x", max_tokens=5, messages=ASK, thinking={"type": "enabled", "budget_tokens": 2})
    assert err.value.body["error"]["type"] == "invalid_request_error" and "`thinking`" in err.value.message
    with pytest.raises(anthropic.UnprocessableEntityError) as err:
        claude.messages.create(model="x", max_tokens=10**6, messages=ASK)
    assert "`max_tokens`" in err.value.message


def test_output_config_format_is_structured_output(claude):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    msg = claude.messages.create(model="x", max_tokens=60, extra_body=GREEDY, messages=[
        {"role": "user", "content": "Invent a person."}], output_config={"format": {"type": "json_schema",
                                                                                     "schema": schema}})
    jsonschema.validate(json.loads(text_of(msg)), schema)
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model="x", max_tokens=5, messages=ASK, output_config={"effort": "high"})
    assert "`output_config.effort`" in err.value.message
