"""A KV cache too small for the offered load: requests wait (or are preempted and recomputed)
and every one still completes with its exact answer; nothing crashes, /ping stays green."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import requests

from conftest import Server

QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Write a haiku about the ocean.",
             "How do bees make honey?", "What is a black hole?", "What is gravity?"]


def chat(url: str, q: str) -> dict:
    r = requests.post(url + "/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": q}], "max_tokens": 100, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def small_cache():
    # 512 cache tokens = 32 blocks; each request needs ~9 (about 40 prompt + 100 new tokens).
    srv = Server(env={"MAX_TOTAL_TOKENS": "512", "MAX_BATCH_TOTAL_TOKENS": "512"})
    yield srv
    srv.stop()


def test_requests_beyond_the_cache_wait_and_finish_exactly(server, small_cache):
    expected = {q: chat(server.url, q)["choices"][0]["message"]["content"] for q in QUESTIONS}
    with cf.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        futures = {q: pool.submit(chat, small_cache.url, q) for q in QUESTIONS}
        assert requests.get(small_cache.url + "/ping", timeout=5).status_code == 200
        got = {q: f.result() for q, f in futures.items()}
    for q in QUESTIONS:
        assert got[q]["choices"][0]["message"]["content"] == expected[q]
        assert got[q]["usage"]["completion_tokens"] == 100
    assert requests.get(small_cache.url + "/ping", timeout=5).status_code == 200


def test_a_request_larger_than_the_context_is_refused_not_queued(small_cache):
    r = requests.post(small_cache.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hello " * 600}], "max_tokens": 10})
    assert r.status_code == 422
    assert "511" in r.json()["error"]["message"] or "512" in r.json()["error"]["message"]
