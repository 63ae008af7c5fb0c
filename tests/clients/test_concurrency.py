"""Concurrent requests must not leak into each other: each concurrent greedy answer equals the
same request's answer when it ran alone (continuous batching, no cross-talk)."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from helpers import chat_body, chat_stream_text, openai_stream_json, post, read_stream

MAX_TOKENS = 24

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "What is 12 plus 7?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
    "List two programming languages.",
    "What do bees make?",
    "Translate 'good morning' to Spanish.",
    "Describe a cat in one sentence.",
    "What is the largest planet?",
    "Suggest a name for a dog.",
    "How many days are in a week?",
    "What is the boiling point of water?",
    "Tell me a fun fact about octopuses.",
    "What does a chef do?",
]

NATIVE_PROMPTS = [
    "The capital of Italy is",
    "Once upon a time, there was a",
    "The three primary colors are",
    "def fibonacci(n):",
    "My favourite food is",
    "The quick brown fox",
    "Water freezes at",
    "In the year 2050,",
]


@pytest.fixture(scope="module")
def server(engine_server):
    """This suite runs on both engines (conftest.engine_server): ours, then vLLM."""
    return engine_server


def _chat_single(server, q: str) -> dict:
    r = post(server, "/v1/chat/completions", chat_body(q, MAX_TOKENS))
    assert r.status_code == 200, r.text
    return r.json()


def _chat_stream(server, q: str) -> tuple[str, list[str], dict | None]:
    resp = post(server, "/v1/chat/completions",
                chat_body(q, MAX_TOKENS, stream=True, stream_options={"include_usage": True}), stream=True)
    assert resp.status_code == 200, resp.text
    chunks = openai_stream_json(read_stream(resp))
    assert chunks[-1] == "[DONE]"
    return chat_stream_text(chunks)


def _native_body(prompt: str) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": MAX_TOKENS, "details": True}}


def _native_single(server, prompt: str) -> dict:
    r = post(server, "/generate", _native_body(prompt))
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def chat_singles(server):
    """Each question's greedy answer, one request at a time."""
    answers = [_chat_single(server, q) for q in QUESTIONS]
    texts = [a["choices"][0]["message"]["content"] for a in answers]
    assert len(set(texts)) == len(texts), "prompts should give distinct answers"
    return answers


@pytest.fixture(scope="module")
def native_singles(server):
    return [_native_single(server, p) for p in NATIVE_PROMPTS]


def _run_together(fns):
    """Start every callable at (nearly) the same moment on its own thread; results in order."""
    barrier = threading.Barrier(len(fns))

    def go(fn):
        barrier.wait(timeout=60)
        return fn()

    with ThreadPoolExecutor(len(fns)) as pool:
        futures = [pool.submit(go, fn) for fn in fns]
        return [f.result() for f in futures]


def _check_chat(single: dict, streamed, q: str) -> None:
    text, finishes, usage = streamed
    ref = single["choices"][0]
    assert text == ref["message"]["content"], f"cross-talk or divergence for {q!r}"
    assert finishes == [ref["finish_reason"]], q
    assert usage is not None, q
    assert usage == single["usage"], q
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if ref["finish_reason"] == "length":
        assert usage["completion_tokens"] == MAX_TOKENS


def test_concurrent_chat_streams_match_single(server, chat_singles):
    results = _run_together([lambda q=q: _chat_stream(server, q) for q in QUESTIONS])
    for q, single, streamed in zip(QUESTIONS, chat_singles, results):
        _check_chat(single, streamed, q)


def test_mixed_chat_streams_and_native_generate(server, chat_singles, native_singles):
    chat_qs = QUESTIONS[:8]
    fns = [lambda q=q: ("chat", _chat_stream(server, q)) for q in chat_qs]
    fns += [lambda p=p: ("native", _native_single(server, p)) for p in NATIVE_PROMPTS]
    # interleave so the two kinds are submitted alternately
    order = [fn for pair in zip(fns[:8], fns[8:]) for fn in pair]
    results = _run_together(order)
    chat_results = [r for kind, r in results if kind == "chat"]
    native_results = [r for kind, r in results if kind == "native"]
    for q, single, streamed in zip(chat_qs, chat_singles[:8], chat_results):
        _check_chat(single, streamed, q)
    for p, single, got in zip(NATIVE_PROMPTS, native_singles, native_results):
        assert got["generated_text"] == single["generated_text"], f"cross-talk or divergence for {p!r}"
        assert got["details"]["finish_reason"] == single["details"]["finish_reason"], p
        assert got["details"]["generated_tokens"] == single["details"]["generated_tokens"], p
        assert [t["id"] for t in got["details"]["tokens"]] == [t["id"] for t in single["details"]["tokens"]], p


def _in_flight(server) -> float:
    """Requests the engine holds (waiting + running), from /metrics."""
    text = requests.get(server.url + "/metrics", timeout=30).text
    return sum(float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
               for name in ("tgi_queue_size", "tgi_batch_current_size"))


def test_a_client_that_leaves_mid_stream_ends_its_request(server, chat_singles):
    """The engine stops generating for nobody: 1500 tokens would take minutes here."""
    resp = post(server, "/v1/chat/completions",
                chat_body("Tell me a long story.", 1500, stream=True, ignore_eos=True), stream=True)
    assert resp.status_code == 200, resp.text
    chunks = resp.iter_content(chunk_size=None)
    next(chunks)  # the first bytes: it is generating
    deadline = time.monotonic() + 10
    while _in_flight(server) < 1 and time.monotonic() < deadline:  # the gauges follow the steps
        next(chunks)
    assert _in_flight(server) >= 1
    resp.close()  # the client leaves
    deadline = time.monotonic() + 60
    while _in_flight(server) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _in_flight(server) == 0
    assert _chat_single(server, QUESTIONS[0])["choices"][0]["message"] == chat_singles[0]["choices"][0]["message"]
