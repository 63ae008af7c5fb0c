"""Tools, structured output, logprobs and several choices with the real model, through the real
`openai` client, huggingface_hub's InferenceClient and /invocations."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import openai
import pytest
import requests

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "address": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["city", "zip"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "address", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(engine_server):
    """This suite runs on both engines (conftest.engine_server): ours, then vLLM."""
    return engine_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=300, max_retries=0)


def params_of(tool: dict) -> dict:
    return tool["function"]["parameters"]


# ---- tools ----

@pytest.mark.parametrize("choice", ["required", "auto"])
def test_tool_call_arguments_match_the_schema(client, choice):
    reply = client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                           temperature=0, max_tokens=100)
    choice0 = reply.choices[0]
    assert choice0.finish_reason == "tool_calls" and choice0.message.content is None
    (call,) = choice0.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, params_of(WEATHER))
    assert args["city"] == "Paris"


def test_stop_strings_do_not_cut_a_tool_call(client):
    reply = client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=100, stop=["Paris", '"'])
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments)["city"] == "Paris"


def test_named_tool_choice_calls_that_function(client):
    reply = client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           max_tokens=100)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), params_of(TIME))


def test_tool_choice_none_answers_in_text(client):
    reply = client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=12)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_call_equals_the_whole_reply(client):
    whole = client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                           temperature=0, max_tokens=100).choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER, TIME],
                                                 tool_choice="required", temperature=0, max_tokens=100, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert calls[0].id and calls[0].function.name == whole[0].function.name and calls[0].function.arguments == ""
    assert all(t.id is None and t.function.name is None for t in calls[1:])
    assert len(calls) > 3  # the arguments come in fragments, token by token
    assert "".join(t.function.arguments for t in calls) == whole[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_render_through_the_template(client):
    """An assistant turn with tool_calls and a `tool` turn, then the model answers from them."""
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees and sunny"}]
    reply = client.chat.completions.create(model="x", messages=messages, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=24)
    assert reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 40  # the call and its result are in the prompt


@pytest.mark.parametrize("body, field, words", [
    ({"tools": [WEATHER], "tool_choice": "get_stock"}, "tool_choice", "Tool with name 'get_stock' not found"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "nosuchtype"}}}]},
     "tools", "Invalid type"),
])
def test_bad_tool_requests_are_422_naming_the_field(server, body, field, words):
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": ASK, **body}, timeout=60)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == field and words in err["message"]
    assert requests.get(server.url + "/ping", timeout=10).status_code == 200


def test_hub_chat_completion_with_tools(hub):
    out = hub.chat_completion(messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=100, temperature=0)
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = call.function.arguments
    jsonschema.validate(json.loads(args) if isinstance(args, str) else args, params_of(WEATHER))


def test_invocations_messages_with_tools(server):
    r = requests.post(server.url + "/invocations", json={"messages": ASK, "tools": [WEATHER], "temperature": 0,
                                                         "tool_choice": "required", "max_tokens": 100}, timeout=120)
    call = r.json()["choices"][0]["message"]["tool_calls"][0]
    jsonschema.validate(json.loads(call["function"]["arguments"]), params_of(WEATHER))


# ---- structured output ----

def test_json_schema_nested_output_validates(client):
    reply = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Describe a person as JSON."}], temperature=0,
        max_tokens=200, response_format={"type": "json_schema",
                                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


def test_json_schema_streamed_and_sampled_still_validates(client):
    for seed in (1, 2):
        chunks = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "A person, as JSON."}], temperature=1.0, seed=seed,
            max_tokens=200, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_mode(client):
    reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "List two fruits."}],
                                           temperature=0, max_tokens=100, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_tgi_regex_and_json_forms_on_invocations(server):
    regex = r"(yes|no|maybe)(, because [a-z ]{1,30})?"
    r = requests.post(server.url + "/invocations", timeout=120, json={
        "messages": [{"role": "user", "content": "Is the sky blue?"}], "max_tokens": 40, "temperature": 0,
        "response_format": {"type": "regex", "value": regex}})
    assert re.fullmatch(regex, r.json()["choices"][0]["message"]["content"])
    r = requests.post(server.url + "/invocations", timeout=120, json={
        "messages": [{"role": "user", "content": "Describe a person."}], "max_tokens": 200, "temperature": 0,
        "response_format": {"type": "json", "value": PERSON}})
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), PERSON)


@pytest.mark.parametrize("fmt, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nosuchtype"}}}, "Invalid type"),
    ({"type": "regex", "value": "(unclosed"}, "not a valid regex"),
    ({"type": "xml"}, "must be one of"),
    ({"type": "json_schema"}, "needs"),
])
def test_bad_formats_are_422_and_the_server_keeps_serving(server, fmt, words):
    r = requests.post(server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": ASK, "max_tokens": 5, "response_format": fmt})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "response_format" and words in r.json()["error"]["message"]
    assert requests.get(server.url + "/ping", timeout=10).status_code == 200


# ---- logprobs ----

def test_logprobs_are_taken_before_sampling_filters(client):
    reply = client.chat.completions.create(model="x", messages=ASK, max_tokens=8, temperature=0.7, top_p=0.05,
                                           seed=3, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)  # top_p would have cut them
        assert all(t <= 0 for t in tops) and sum(math.exp(t) for t in tops) <= 1.0001
        assert entry.logprob <= tops[0] + 1e-6 and entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in content) == reply.choices[0].message.content


def test_streamed_logprobs_match(client):
    whole = client.chat.completions.create(model="x", messages=ASK, max_tokens=8, temperature=0, logprobs=True,
                                           top_logprobs=2).choices[0].logprobs.content
    chunks = client.chat.completions.create(model="x", messages=ASK, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=2, stream=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]


@pytest.mark.parametrize("extra, field", [({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
                                          ({"top_logprobs": 2}, "top_logprobs")])
def test_bad_logprobs_requests(server, extra, field):
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": ASK, **extra}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["param"] == field


# ---- several choices ----

def test_n_choices_in_one_request(client):
    reply = client.chat.completions.create(model="x", messages=ASK, max_tokens=10, temperature=1.0, seed=7, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # each choice draws its own tokens
    again = client.chat.completions.create(model="x", messages=ASK, max_tokens=10, temperature=1.0, seed=7, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    single = client.chat.completions.create(model="x", messages=ASK, max_tokens=10, temperature=1.0, seed=7)
    assert single.choices[0].message.content == reply.choices[0].message.content
    assert reply.usage.completion_tokens <= 30 and reply.usage.prompt_tokens == single.usage.prompt_tokens


def test_n_choices_streamed_carry_their_index(client):
    whole = client.chat.completions.create(model="x", messages=ASK, max_tokens=10, temperature=1.0, seed=7, n=3)
    chunks = list(client.chat.completions.create(model="x", messages=ASK, max_tokens=10, temperature=1.0, seed=7,
                                                 n=3, stream=True, stream_options={"include_usage": True}))
    texts, finishes = {}, {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices} and set(finishes) == {0, 1, 2}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_with_a_schema_gives_valid_choices(client):
    reply = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "A person, as JSON."}], temperature=1.0, seed=5, n=2,
        max_tokens=200, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_n_over_the_limit(server):
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": ASK, "n": 9}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["param"] == "n" and "MAX_CHOICES" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_native_grammar_parameter(server, stream):
    body = {"inputs": "A person described as JSON:", "stream": stream,
            "parameters": {"max_new_tokens": 200, "grammar": {"type": "json", "value": PERSON}}}
    r = requests.post(server.url + ("/generate_stream" if stream else "/generate"), json=body, timeout=120)
    if stream:
        events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
        text = events[-1]["generated_text"]
    else:
        text = r.json()["generated_text"]
    jsonschema.validate(json.loads(text), PERSON)


def test_completions_n_choices_per_prompt(client):
    r = client.completions.create(model="x", prompt=["The sky is", "Grass is"], max_tokens=6, temperature=1.0,
                                  seed=3, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    first = client.completions.create(model="x", prompt="The sky is", max_tokens=6, temperature=1.0, seed=3)
    assert r.choices[0].text == first.choices[0].text and r.choices[1].text != r.choices[0].text
    assert r.usage.completion_tokens <= 24


@pytest.mark.parametrize("stream", [False, True])
def test_completions_legacy_logprobs(client, stream):
    kw = dict(model="x", prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=3)
    if stream:
        chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
        text = "".join(c.choices[0].text for c in chunks)
        lp = {k: [v for c in chunks if c.choices[0].logprobs for v in getattr(c.choices[0].logprobs, k)]
              for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    else:
        choice = client.completions.create(**kw).choices[0]
        text, lp = choice.text, choice.logprobs.model_dump()
    assert "".join(lp["tokens"]) == text and len(lp["token_logprobs"]) == len(lp["tokens"])
    assert all(len(top) == 3 and max(top.values()) >= lp_ - 1e-6
               for top, lp_ in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
