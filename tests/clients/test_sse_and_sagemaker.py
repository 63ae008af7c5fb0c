"""Wire-level checks with plain `requests`: SSE framing, native vs SageMaker /invocations shapes,
SageMaker's LineIterator over a re-chunked stream, and the auxiliary routes."""

from __future__ import annotations

import json
import re

import pytest
import requests

from helpers import (chat_body, chat_stream_text, data_of, openai_stream_json, post, read_stream,
                     split_events)

PROMPT = "The capital of France is"
QUESTION = "Name three colors."


@pytest.fixture(scope="module")
def server(engine_server):
    """This suite runs on both engines (conftest.engine_server): ours, then vLLM."""
    return engine_server


def _read_to_eof(resp: requests.Response) -> bytes:
    """The whole body, as a client that reads until the server ends the response does."""
    buf = b""
    try:
        for piece in resp.iter_content(chunk_size=None):
            buf += piece
    except requests.exceptions.ChunkedEncodingError as exc:
        pytest.fail(f"server did not end the chunked SSE body cleanly ({exc}); "
                    f"{len(buf)} bytes received, ending {buf[-120:]!r}")
    finally:
        resp.close()
    return buf


def _check_sse_headers(resp: requests.Response) -> None:
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].split(";")[0].strip() == "text/event-stream"
    assert resp.headers.get("Cache-Control") == "no-cache"
    assert "Content-Length" not in resp.headers


# ---- SSE framing ----

def test_chat_stream_framing(server):
    resp = post(server, "/v1/chat/completions", chat_body(QUESTION, 8, stream=True), stream=True)
    _check_sse_headers(resp)
    raw = _read_to_eof(resp)
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    assert re.fullmatch(rb"data: ?\[DONE\]", events[-1]), events[-1]
    assert sum(b"[DONE]" in e for e in events) == 1
    for ev in events[:-1]:
        assert re.fullmatch(rb"data: ?\{.*\}", ev), ev
        obj = json.loads(data_of(ev))
        assert obj["object"] == "chat.completion.chunk"


def test_generate_stream_framing(server):
    resp = post(server, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}}, stream=True)
    _check_sse_headers(resp)
    raw = _read_to_eof(resp)
    assert b"[DONE]" not in raw
    events = [json.loads(data_of(e)) for e in split_events(raw)]
    assert len(events) == 6
    assert [e["index"] for e in events] == list(range(1, 7))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    final = events[-1]
    assert final["generated_text"] is not None
    gen = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}}).json()
    assert final["generated_text"] == gen["generated_text"]


def test_generate_stream_events_tolerant(server):
    """Same stream read up to its final event (as SDKs do): shape of each event."""
    resp = post(server, "/generate_stream",
                {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": True}}, stream=True)
    events = [json.loads(data_of(e)) for e in split_events(read_stream(resp, native=True))]
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    for e in events:
        assert set(e["token"]) >= {"id", "text", "logprob", "special"}
    assert all(e["generated_text"] is None for e in events[:-1])
    d = events[-1]["details"]
    assert d["generated_tokens"] == len(events)
    assert d["finish_reason"] in ("length", "eos_token", "stop_sequence")
    assert d["input_length"] > 0


# ---- native /invocations vs /generate ----

def test_invocations_native_full_text(server):
    params = {"max_new_tokens": 8}
    r = post(server, "/invocations", {"inputs": PROMPT, "parameters": params})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list) and len(body) == 1
    full = body[0]["generated_text"]
    assert full.startswith(PROMPT) and len(full) > len(PROMPT)

    r = post(server, "/invocations", {"inputs": PROMPT, "parameters": {**params, "return_full_text": False}})
    new = r.json()
    assert isinstance(new, list) and len(new) == 1
    new_text = new[0]["generated_text"]
    assert not new_text.startswith(PROMPT)
    assert full == PROMPT + new_text

    gen = post(server, "/generate", {"inputs": PROMPT, "parameters": params}).json()
    assert isinstance(gen, dict)
    assert gen["generated_text"] == new_text
    assert "details" not in gen


def test_invocations_messages_is_chat_completion(server):
    ref = post(server, "/v1/chat/completions", chat_body(QUESTION, 12)).json()
    r = post(server, "/invocations", chat_body(QUESTION, 12))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]
    assert body["usage"] == ref["usage"]


def test_invocations_messages_stream_is_sse(server):
    ref = post(server, "/v1/chat/completions", chat_body(QUESTION, 12)).json()
    resp = post(server, "/invocations", chat_body(QUESTION, 12, stream=True), stream=True)
    _check_sse_headers(resp)
    chunks = openai_stream_json(read_stream(resp))
    assert chunks[-1] == "[DONE]"
    text, finishes, _ = chat_stream_text(chunks)
    assert text == ref["choices"][0]["message"]["content"]
    assert finishes == [ref["choices"][0]["finish_reason"]]


# ---- SageMaker SDK LineIterator over an event stream ----

def _payload_parts(raw: bytes, size: int = 7):
    """What InvokeEndpointWithResponseStream hands the SDK: the body cut at arbitrary places."""
    return [{"PayloadPart": {"Bytes": raw[i:i + size]}} for i in range(0, len(raw), size)]


def _line_iterator_data(raw: bytes, size: int = 7) -> list[str]:
    from sagemaker.iterators import LineIterator

    lines = list(LineIterator(_payload_parts(raw, size)))
    assert all(isinstance(line, bytes) for line in lines)
    out = []
    for line in lines:
        if line.startswith(b"data:"):
            out.append(data_of(line))
        else:
            assert line in (b"", b":"), line  # blank separators (or keep-alive comments) only
    return out


@pytest.mark.parametrize("size", [7, 1, 64])
def test_line_iterator_chat_stream(server, size):
    resp = post(server, "/invocations", chat_body(QUESTION, 12, stream=True), stream=True)
    raw = read_stream(resp)
    direct = openai_stream_json(raw)
    datas = _line_iterator_data(raw, size)
    assert datas[-1] == "[DONE]"
    parsed = [d if d == "[DONE]" else json.loads(d) for d in datas]
    assert parsed == direct
    text, finishes, _ = chat_stream_text(parsed)
    ref = post(server, "/v1/chat/completions", chat_body(QUESTION, 12)).json()
    assert text == ref["choices"][0]["message"]["content"]
    assert len(finishes) == 1


def test_line_iterator_native_stream(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8}, "stream": True}
    resp = post(server, "/invocations", body, stream=True)
    _check_sse_headers(resp)
    raw = read_stream(resp, native=True)
    events = [json.loads(d) for d in _line_iterator_data(raw, 7)]
    assert events == [json.loads(data_of(e)) for e in split_events(raw)]
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None for e in events[:-1])
    ref = post(server, "/invocations", {"inputs": PROMPT, "parameters": {"max_new_tokens": 8}}).json()
    assert events[-1]["generated_text"] == ref[0]["generated_text"]  # prompt prepended on /invocations
    assert "[DONE]" not in raw.decode()


# ---- auxiliary routes ----

def test_ping_and_health(server):
    for path in ("/ping", "/health"):
        r = requests.get(server.url + path, timeout=30)
        assert r.status_code == 200, path


def test_info(server):
    info = requests.get(server.url + "/info", timeout=30).json()
    assert info["model_id"]
    assert 0 < info["max_input_tokens"] < info["max_total_tokens"]
    models = requests.get(server.url + "/v1/models", timeout=30).json()["data"]
    assert models[0]["id"] in (info["model_id"], info.get("served_model_name"))


def test_tokenize(server):
    text = "Hello wörld"
    r = post(server, "/tokenize", {"inputs": text})
    assert r.status_code == 200, r.text
    toks = r.json()
    assert isinstance(toks, list) and toks
    raw = text.encode()
    for t in toks:
        assert isinstance(t["id"], int)
        assert 0 <= t["start"] <= t["stop"] <= len(raw)
        assert raw[t["start"]:t["stop"]].decode() == t["text"]  # byte offsets
    assert "".join(t["text"] for t in toks) == text


def _request_count(server) -> float:
    r = requests.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200
    assert "tgi_request_count" in r.text
    m = re.search(r"^tgi_request_count(?:_total)?(?:\{[^}]*\})? ([0-9.e+]+)$", r.text, re.M)
    assert m, r.text[:500]
    return float(m.group(1))


def test_metrics_request_count(server):
    before = _request_count(server)
    assert post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}}).status_code == 200
    assert _request_count(server) >= before + 1


def test_metrics_engine_phases(server):
    assert post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}).status_code == 200
    text = requests.get(server.url + "/metrics", timeout=30).text
    steps = float(re.search(r"^sagellm_engine_steps (\S+)$", text, re.M).group(1))
    phases = dict(re.findall(r'^sagellm_engine_phase_seconds\{phase="(\w+)"\} (\S+)$', text, re.M))
    assert steps >= 2
    if server.engine == "vllm":
        # Documented difference (README, two engines): vLLM's engine core runs in its own process
        # and reports no per-phase times, so the series is absent rather than zeros.
        assert phases == {}
        return
    assert set(phases) == {"schedule", "prepare", "forward", "sample", "output"}
    assert float(phases["forward"]) > 0


# ---- introspection through /invocations (the only route SageMaker users reach) ----

def test_invocations_action_info(server):
    body = requests.post(server.url + "/invocations", json={"action": "info"}, timeout=30).json()
    assert body == {**requests.get(server.url + "/info", timeout=30).json(),
                    "invocations_actions": ["info", "tokenize", "apply_chat_template"]}


def test_invocations_action_tokenize(server):
    body = requests.post(server.url + "/invocations", json={"action": "tokenize", "inputs": "Hello world"},
                         timeout=30).json()
    assert body["tokens"] == requests.post(server.url + "/tokenize", json={"inputs": "Hello world"}, timeout=30).json()
    assert body["count"] == len(body["tokens"])


def test_invocations_action_apply_chat_template_counts_what_a_chat_uses(server):
    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 3}
    shown = requests.post(server.url + "/invocations", json={"action": "apply_chat_template", **chat},
                          timeout=30).json()
    assert "What is the capital of France?" in shown["prompt"] and shown["prompt"].endswith("assistant\n")
    used = requests.post(server.url + "/invocations", json=chat, timeout=60).json()["usage"]
    assert shown["prompt_tokens"] == used["prompt_tokens"] == len(shown["token_ids"])
    assert shown["max_new_tokens"] == 3 and shown["max_total_tokens"] > shown["prompt_tokens"]


def test_invocations_unknown_action(server):
    r = requests.post(server.url + "/invocations", json={"action": "explode"}, timeout=30)
    assert r.status_code == 422 and "`action` must be one of" in r.json()["error"]
