"""Real answers of the real server, on every API, validate against the server's own OpenAPI
document: bodies, each stream event and errors, and the requests sent validate as its requests."""

from __future__ import annotations

import json

import jsonschema
import pytest
import requests

from helpers import TIMEOUT, read_stream, split_events

CHAT = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def doc(server):
    return requests.get(server.url + "/openapi.json", timeout=30).json()


def check(doc: dict, schema: dict, instance) -> None:
    jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(instance)


def content(doc, path, method, status="200", media="application/json") -> dict:
    return doc["paths"][path][method]["responses"][status]["content"][media]["schema"]


def call(server, doc, method: str, path: str, body=None, route=None, stream=False, status=200):
    """Sends the request (validated as the route's request body), checks the answer against the route."""
    route = route or path
    if body is not None:
        check(doc, doc["paths"][route][method]["requestBody"]["content"]["application/json"]["schema"], body)
    r = requests.request(method, server.url + path, json=body, timeout=TIMEOUT, stream=stream)
    assert r.status_code == status, r.text[:300]
    if status != 200:
        check(doc, content(doc, route, method, "default"), r.json())
        return r.json()
    if not stream:
        check(doc, content(doc, route, method), r.json())
        return r.json()
    events = []
    for event in split_events(read_stream(r, native="/generate" in path)):
        data = [line for line in event.split(b"\n") if line.startswith(b"data:")][0][5:].strip()
        if data != b"[DONE]":
            events.append(json.loads(data))
            check(doc, content(doc, route, method, media="text/event-stream"), events[-1])
    assert events
    return events


def test_tgi_routes(server, doc):
    call(server, doc, "get", "/info")
    call(server, doc, "post", "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True}})
    call(server, doc, "post", "/generate_stream", {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, stream=True)
    call(server, doc, "post", "/tokenize", {"inputs": "Hello there"})
    call(server, doc, "post", "/invocations", {"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    call(server, doc, "post", "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 0}}, status=422)


def test_openai_routes(server, doc):
    call(server, doc, "get", "/v1/models")
    chat = {"messages": CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    call(server, doc, "post", "/v1/chat/completions", chat)
    call(server, doc, "post", "/v1/chat/completions", {**chat, "stream": True,
                                                       "stream_options": {"include_usage": True}}, stream=True)
    call(server, doc, "post", "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "logprobs": 1})
    call(server, doc, "post", "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "stream": True}, stream=True)
    call(server, doc, "post", "/invocations", {"messages": CHAT, "max_tokens": 3})
    call(server, doc, "post", "/v1/chat/completions", {"messages": CHAT, "max_tokens": -1}, status=422)


def test_responses_routes(server, doc):
    body = {"input": "Say hello", "max_output_tokens": 3, "include": ["message.output_text.logprobs"]}
    resp = call(server, doc, "post", "/v1/responses", body)
    call(server, doc, "post", "/v1/responses", {**body, "stream": True}, stream=True)
    weather = {"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    tools = {"input": "Weather in Paris?", "tools": [weather], "tool_choice": "required", "max_output_tokens": 40}
    call(server, doc, "post", "/v1/responses", tools)
    call(server, doc, "post", "/v1/responses", {**tools, "stream": True}, stream=True)
    path = f"/v1/responses/{resp['id']}"
    call(server, doc, "get", path, route="/v1/responses/{response_id}")
    call(server, doc, "delete", path, route="/v1/responses/{response_id}")
    call(server, doc, "get", path, route="/v1/responses/{response_id}", status=404)
    call(server, doc, "post", "/invocations", {"input": "Say hello", "max_output_tokens": 3})
    call(server, doc, "get", "/v1/nothing", route="/v1/models", status=404)


def test_anthropic_routes(server, doc):
    body = {"max_tokens": 3, "system": "Be brief.", "messages": CHAT}
    call(server, doc, "post", "/v1/messages", body)
    call(server, doc, "post", "/v1/messages", {**body, "stream": True}, stream=True)
    tools = {"max_tokens": 40, "messages": CHAT, "tool_choice": {"type": "any"}, "tools": [
        {"name": "greet", "input_schema": {"type": "object", "properties": {"who": {"type": "string"}}}}]}
    call(server, doc, "post", "/v1/messages", tools)
    call(server, doc, "post", "/v1/messages", {**tools, "stream": True}, stream=True)
    call(server, doc, "post", "/v1/messages/count_tokens", {"messages": CHAT})
    call(server, doc, "post", "/invocations", {"anthropic_version": "bedrock-2023-05-31", **body})
    r = requests.post(server.url + "/v1/messages", json={"messages": CHAT}, timeout=TIMEOUT)
    assert r.status_code == 422
    check(doc, content(doc, "/v1/messages", "post", "default"), r.json())
