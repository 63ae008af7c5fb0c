"""The response models serialise to the wire shapes clients read: fields that are always there
(null included), fields present only when given, the error shapes in a body and in a stream."""

from __future__ import annotations

import json

from sagellm.api.error_shapes import error_body, error_event, generation_failed, invalid
from sagellm.api.protocol_openai import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk,
                                         ChunkChoice, Completion, CompletionChoice, Delta, FunctionCall,
                                         FunctionDelta, ModelCard, ModelList, ToolCall, ToolCallDelta, Usage)
from sagellm.api.protocol_tgi import Details, GenerateResponse, StreamChunk, StreamDetails, Token
from sagellm.api.responses import json_text, jsonable, sse
from sagellm.errors import Overloaded

HEAD = dict(id="chatcmpl-1", created=7, model="m", system_fingerprint="sagellm-0.1.0")
TOKEN = Token(id=5, text="Hi", logprob=-0.25, special=False)


def wire(model) -> dict:
    return json.loads(json_text(model))


def test_tgi_stream_chunk_writes_text_and_details_as_null_until_the_end():
    assert wire(StreamChunk(index=1, token=TOKEN)) == {
        "index": 1, "token": {"id": 5, "text": "Hi", "logprob": -0.25, "special": False},
        "generated_text": None, "details": None}
    last = StreamChunk(index=2, token=TOKEN, top_tokens=[TOKEN], generated_text="Hi",
                       details=StreamDetails(finish_reason="length", generated_tokens=2, seed=None, input_length=3))
    assert list(wire(last)) == ["index", "token", "top_tokens", "generated_text", "details"]
    assert wire(last)["details"] == {"finish_reason": "length", "generated_tokens": 2, "seed": None, "input_length": 3}


def test_tgi_generate_has_details_only_when_asked():
    assert wire(GenerateResponse(generated_text="Hi")) == {"generated_text": "Hi"}
    details = Details(finish_reason="eos_token", generated_tokens=1, seed=3, prefill=[], tokens=[TOKEN])
    assert set(wire(GenerateResponse(generated_text="Hi", details=details))["details"]) == {
        "finish_reason", "generated_tokens", "seed", "prefill", "tokens"}


def test_chat_chunk_stop_reason_and_usage_appear_only_when_given():
    running = ChatCompletionChunk(**HEAD, choices=[ChunkChoice(index=0, delta=Delta(content="a"))])
    assert wire(running) == {**HEAD, "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": "a"}, "logprobs": None, "finish_reason": None}]}
    end = ChatCompletionChunk(**HEAD, usage=None, choices=[
        ChunkChoice(index=0, delta=Delta(), finish_reason="stop", stop_reason=None)])
    assert wire(end)["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop",
                                       "stop_reason": None}
    assert wire(end)["usage"] is None


def test_tool_call_deltas_and_whole_calls():
    first = ToolCallDelta(index=0, id="call_1", type="function", function=FunctionDelta(name="f", arguments=""))
    more = ToolCallDelta(index=0, function=FunctionDelta(arguments='{"a"'))
    assert wire(Delta(tool_calls=[first, more])) == {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"a"'}}]}
    message = AssistantMessage(content=None, tool_calls=[ToolCall(id="call_1", function=FunctionCall(name="f",
                                                                                                     arguments="{}"))])
    whole = ChatCompletion(**HEAD, usage=Usage.of(3, 4), choices=[
        ChatChoice(index=0, message=message, logprobs=None, finish_reason="tool_calls", stop_reason=None)])
    body = wire(whole)
    assert body["object"] == "chat.completion" and body["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert body["choices"][0]["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert wire(AssistantMessage(content="hello")) == {"role": "assistant", "content": "hello"}


def test_completion_choice_and_model_list():
    chunk = Completion(**HEAD, choices=[CompletionChoice(index=0, text="x", logprobs=None, finish_reason=None)])
    assert wire(chunk)["object"] == "text_completion" and "usage" not in wire(chunk)
    assert wire(chunk)["choices"] == [{"index": 0, "text": "x", "logprobs": None, "finish_reason": None}]
    assert wire(ModelList(data=[ModelCard(id="m", max_model_len=2048)])) == {"object": "list", "data": [
        {"id": "m", "object": "model", "created": 0, "owned_by": "sagellm", "max_model_len": 2048}]}


def test_error_bodies_and_the_event_a_failing_stream_ends_with():
    exc = Overloaded("too busy")
    assert wire(error_body(exc, "tgi")) == {"error": "too busy", "error_type": "overloaded"}
    assert wire(error_body(exc, "openai")) == {"error": {"message": "too busy", "type": "rate_limit_error",
                                                         "param": None, "code": 429}}
    failed = generation_failed("CUDA out of memory")
    assert failed.status == 424 and failed.message == "Request failed during generation: CUDA out of memory"
    assert generation_failed(None).message == "Request failed during generation: aborted"
    assert error_event(failed, "tgi") == sse({"error": failed.message, "error_type": "generation"})
    event = json.loads(error_event(failed, "openai")[len(b"data: "):])
    assert event == {"error": {"message": failed.message, "type": "server_error", "param": None, "code": 424,
                               "http_status_code": 424}}
    bad = invalid("`n` must be >= 1", "n")
    assert (bad.status, bad.param, bad.message) == (422, "n", "Input validation error: `n` must be >= 1")


def test_plain_json_and_lists_of_models_pass_through():
    assert jsonable([GenerateResponse(generated_text="a")]) == [{"generated_text": "a"}]
    assert json_text({"é": [TOKEN]}) == '{"é":[{"id":5,"text":"Hi","logprob":-0.25,"special":false}]}'
