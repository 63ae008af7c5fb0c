"""OpenAI's Responses API with the real `openai` client against the real server and model:
create and stream (the typed events), the token limit, tools with a round trip, json_schema,
previous_response_id and the store (GET, DELETE, 404), and the fields that are refused. Greedy
answers equal the chat completions route's for the same conversation: one engine path."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"type": "function", "name": "get_time", "description": "The current time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(engine_server):
    """This suite runs on both engines (conftest.engine_server): ours, then vLLM."""
    return engine_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=300, max_retries=0)


def chat_text(client, messages, max_tokens):
    reply = client.chat.completions.create(model="x", messages=messages, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content, reply.usage


def test_create_equals_chat_completions(client):
    resp = client.responses.create(model="x", instructions="You are terse.", input="Name a colour.",
                                   max_output_tokens=12, temperature=0)
    text, usage = chat_text(client, [{"role": "system", "content": "You are terse."},
                                     {"role": "user", "content": "Name a colour."}], 12)
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.output_text == text and text
    assert resp.status in ("completed", "incomplete") and resp.output[0].type == "message"
    assert resp.usage.input_tokens == usage.prompt_tokens
    assert resp.usage.output_tokens == usage.completion_tokens
    assert resp.usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_cut_by_the_length_limit_is_incomplete(client):
    resp = client.responses.create(model="x", input="Write a long story about a dragon.", max_output_tokens=4,
                                   temperature=0)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 4 and resp.output[0].status == "incomplete"


def test_stream_events_in_order_and_equal_to_create(client):
    args = dict(model="x", input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hi."}]}],
                max_output_tokens=40, temperature=0)
    whole = client.responses.create(**args)
    with client.responses.stream(**args) as stream:
        events = list(stream)
        # The client keeps a final response for response.completed only; an incomplete one is in its event.
        final = stream.get_final_response() if whole.status == "completed" else events[-1].response
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text and final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_tool_round_trip(client, choice):
    ask = "What is the weather in Paris?"
    first = client.responses.create(model="x", input=ask, tools=[WEATHER, TIME], tool_choice=choice,
                                    parallel_tool_calls=False, temperature=0, max_output_tokens=60)
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "22 degrees and sunny"}
    # The same conversation, once from the store and once sent whole: the same answer.
    chained = client.responses.create(model="x", previous_response_id=first.id, input=[result], tools=[WEATHER],
                                      tool_choice="none", temperature=0, max_output_tokens=16)
    call_item = {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments}
    sent = client.responses.create(model="x", input=[{"role": "user", "content": ask}, call_item, result],
                                   tools=[WEATHER], tool_choice="none", temperature=0, max_output_tokens=16)
    assert chained.output_text and chained.output_text == sent.output_text
    assert chained.usage.input_tokens == sent.usage.input_tokens


def test_streamed_tool_call_equals_the_whole_one(client):
    args = dict(model="x", input="What is the time in Rome?", tools=[WEATHER, TIME], tool_choice="required",
                temperature=0, max_output_tokens=60)
    whole = client.responses.create(**args)
    with client.responses.stream(**args) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    calls = [item for item in whole.output if item.type == "function_call"]
    assert streamed == done.arguments == calls[0].arguments == final.output[0].arguments
    assert final.output[0].name == calls[0].name


def test_json_schema_output_matches_the_schema(client):
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    resp = client.responses.create(model="x", input="Invent a person.", text={"format": fmt}, temperature=0,
                                   max_output_tokens=60)
    jsonschema.validate(json.loads(resp.output_text), PERSON)
    assert resp.text.format.type == "json_schema"
    obj = client.responses.create(model="x", input="Describe a cat as JSON.", text={"format": {"type": "json_object"}},
                                  temperature=0, max_output_tokens=40)
    assert obj.status == "incomplete" or isinstance(json.loads(obj.output_text), dict)


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model="x", input="My name is Ada.", max_output_tokens=8, temperature=0)
    second = client.responses.create(model="x", previous_response_id=first.id, input="What is my name?",
                                     max_output_tokens=8, temperature=0)
    text, usage = chat_text(client, [{"role": "user", "content": "My name is Ada."},
                                     {"role": "assistant", "content": first.output_text},
                                     {"role": "user", "content": "What is my name?"}], 8)
    assert second.previous_response_id == first.id and second.output_text == text
    assert second.usage.input_tokens == usage.prompt_tokens


def test_store_get_delete_and_unknown_ids(client):
    resp = client.responses.create(model="x", input="Hello", max_output_tokens=3, temperature=0)
    got = client.responses.retrieve(resp.id)
    assert got.id == resp.id and got.output_text == resp.output_text
    client.responses.delete(resp.id)
    for call in (lambda: client.responses.retrieve(resp.id), lambda: client.responses.delete(resp.id),
                 lambda: client.responses.create(model="x", input="Hi", previous_response_id=resp.id)):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert resp.id in err.value.message
    unstored = client.responses.create(model="x", input="Hello", max_output_tokens=3, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize("extra,field", [
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
])
def test_unsupported_fields_are_400_naming_them(client, extra, field):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="x", input="Hi", max_output_tokens=3, **extra)
    assert err.value.status_code == 400 and err.value.body["param"] == field and f"`{field}`" in err.value.message


def test_limits_name_the_responses_fields(client):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.responses.create(model="x", input="Hi", max_output_tokens=10**6)
    assert err.value.body["param"] == "max_output_tokens" and "`max_output_tokens`" in err.value.message
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.responses.create(model="x", input=[{"role": "user", "content": [{"type": "input_image"}]}])
    assert err.value.body["param"] == "input.0.content.0.type"
