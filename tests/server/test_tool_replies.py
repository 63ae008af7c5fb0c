"""Tool-call replies over HTTP with a scripted engine (the 135M bundled model never writes two
calls in one reply, nor declines a tool, so the shapes of those replies are checked here; the
model itself is exercised in tests/clients/test_tools_and_structured.py)."""

from __future__ import annotations

import json

import pytest
from fakes import make_ctx, sse_events

from sagellm.engine.client import RequestStream
from sagellm.engine.events import FinishReason, TokenEvent
from sagellm.server.app import create_app
from sagellm.settings import Settings

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
ASK = {"messages": [{"role": "user", "content": "Weather in Paris and the time?"}], "tools": TOOLS}
TWO_CALLS = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
DECLINE = '[{"name": "no_tool", "arguments": {}}]'


class Scripted:
    """Replies with `constrained` when the request carries a grammar, else with `plain`, a few
    characters per token."""

    def __init__(self, constrained: str, plain: str = "Just text."):
        self.constrained, self.plain = constrained, plain
        self.submitted, self.aborted = [], []

    def submit(self, ids, params):
        text = self.constrained if params.grammar is not None else self.plain
        self.submitted.append((ids, params))
        return _Handle(self, f"r{len(self.submitted)}", text)


class _Handle(RequestStream):
    def __init__(self, engine, request_id, text):
        self.engine, self.request_id, self.text = engine, request_id, text
        self.prompt_len, self.seed = 3, None

    def iter_events(self, idle_s=None):
        pieces = [self.text[i:i + 3] for i in range(0, len(self.text), 3)]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            yield TokenEvent(i, 100 + i, piece, None, False, piece,
                             finish_reason=FinishReason.EOS_TOKEN if last else None)

    def abort(self):
        self.engine.aborted.append(self.request_id)


def client_for(engine: Scripted):
    class Runtime:
        state, engine_ = "ready", None
        ctx = make_ctx(Settings(), engine, compile_grammar=lambda kind, value, param: ("grammar", kind))

        def healthy(self):
            return True, "ok"
    rt = Runtime()
    rt.engine = None
    app = create_app(Settings(), runtime=rt)
    app.testing = True
    return app.test_client()


def test_two_calls_in_one_reply():
    body = client_for(Scripted(TWO_CALLS)).post("/v1/chat/completions", json=ASK).get_json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {}]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)


def test_two_calls_streamed_as_openai_deltas():
    r = client_for(Scripted(TWO_CALLS)).post("/v1/chat/completions", json={**ASK, "stream": True})
    docs = [json.loads(e) for e in sse_events(r.get_data())[:-1]]
    deltas = [d["choices"][0]["delta"] for d in docs if d["choices"]]
    calls = [c for d in deltas for c in d.get("tool_calls") or []]
    heads = [c for c in calls if "id" in c]
    assert [(h["index"], h["function"]["name"]) for h in heads] == [(0, "get_weather"), (1, "get_time")]
    for index, expected in enumerate(['{"city": "Paris"}', "{}"]):
        assert "".join(c["function"]["arguments"] for c in calls if c["index"] == index) == expected
    assert docs[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(d.get("content") for d in deltas)


@pytest.mark.parametrize("stream", [False, True])
def test_a_declined_call_is_answered_in_plain_text(stream):
    engine = Scripted(DECLINE, plain="Hello there.")
    r = client_for(engine).post("/v1/chat/completions", json={**ASK, "stream": stream})
    if stream:
        docs = [json.loads(e) for e in sse_events(r.get_data())[:-1]]
        text = "".join(d["choices"][0]["delta"].get("content") or "" for d in docs if d["choices"])
        finish = docs[-1]["choices"][0]["finish_reason"]
        assert not any(d["choices"][0]["delta"].get("tool_calls") for d in docs if d["choices"])
    else:
        choice = r.get_json()["choices"][0]
        text, finish = choice["message"]["content"], choice["finish_reason"]
        assert "tool_calls" not in choice["message"]
    assert (text, finish) == ("Hello there.", "stop")
    (first_ids, first), (plain_ids, plain) = engine.submitted
    assert first.grammar is not None and plain.grammar is None
    assert engine.aborted[0] == "r1"  # the constrained request stops as soon as it declines


def test_a_call_cut_by_max_tokens_is_length_with_the_text():
    class Cut(Scripted):
        def submit(self, ids, params):
            h = super().submit(ids, params)
            h.iter_events = lambda idle_s=None: iter([TokenEvent(0, 1, '[{"name"', None, False, '[{"name"',
                                                                 finish_reason=FinishReason.LENGTH)])
            return h
    choice = client_for(Cut(TWO_CALLS)).post("/v1/chat/completions", json=ASK).get_json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == '[{"name"'
