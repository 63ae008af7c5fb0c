"""What operators measure, through real gunicorn: /metrics under TGI's and vLLM's names (time to
first token, inter-token latency, queue time, end-to-end latency, token counters, KV cache
usage, outcomes with a client that left counted as cancelled), and one JSON log line per request
with the request id the client sent (returned in the response headers), never the prompt."""

from __future__ import annotations

import json
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server
from helpers import TIMEOUT, chat_body, openai_stream_json, read_stream

SECRET_WORDS = "zebra kumquat telescope"  # in prompts; must never reach the log


@pytest.fixture(scope="module")
def srv():
    s = Server(env={"MAX_CONCURRENT_REQUESTS": "8"})
    yield s
    s.stop()


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    text = requests.get(url + "/metrics", timeout=30).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_metrics_under_tgi_and_vllm_names(srv):
    before = scrape(srv.url)
    r = requests.post(srv.url + "/v1/chat/completions", stream=True, timeout=TIMEOUT,
                      json=chat_body(SECRET_WORDS, max_tokens=5, ignore_eos=True, stream=True,
                                     stream_options={"include_usage": True}))
    usage = [c for c in openai_stream_json(read_stream(r)) if c != "[DONE]" and c.get("usage")][-1]["usage"]
    g = requests.post(srv.url + "/generate", timeout=TIMEOUT,
                      json={"inputs": SECRET_WORDS, "parameters": {"max_new_tokens": 3, "ignore_eos": True}})
    assert g.status_code == 200, g.text
    n_prompt = usage["prompt_tokens"] + int(g.headers["x-prompt-tokens"])
    assert usage["completion_tokens"] == 5 and g.headers["x-generated-tokens"] == "3"
    after = scrape(srv.url)

    assert delta(before, after, "tgi_request_count") == 2
    assert delta(before, after, "tgi_request_success") == 2
    assert delta(before, after, "vllm:prompt_tokens_total") == n_prompt
    assert delta(before, after, "vllm:generation_tokens_total") == 8
    assert delta(before, after, "tgi_request_input_length_sum") == n_prompt
    assert delta(before, after, "tgi_request_generated_tokens_sum") == 8
    assert delta(before, after, "vllm:request_success_total", finished_reason="length") == 2
    assert delta(before, after, "sagellm_request_outcome_total", outcome="success") == 2
    # One observation per request, one per gap between a request's tokens.
    for name in ("tgi_request_duration_count", "tgi_request_queue_duration_count",
                 "tgi_request_mean_time_per_token_duration_count", "vllm:time_to_first_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count"):
        assert delta(before, after, name) == 2, name
    assert delta(before, after, "vllm:inter_token_latency_seconds_count") == 4 + 2
    ttft = delta(before, after, "vllm:time_to_first_token_seconds_sum")
    e2e = delta(before, after, "vllm:e2e_request_latency_seconds_sum")
    assert 0 < ttft < e2e
    # Engine state at scrape time.
    used, total = value(after, "sagellm_kv_cache_blocks_used"), value(after, "sagellm_kv_cache_blocks_total")
    assert total > 0 and value(after, "vllm:kv_cache_usage_perc") == pytest.approx(used / total)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "tgi_batch_current_size",
                 "tgi_queue_size"):
        assert any(n == name for n, _ in after), name
    model = requests.get(srv.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    assert value(after, "vllm:time_to_first_token_seconds_count", model_name=model) > 0


def test_a_client_that_leaves_is_counted_as_cancelled(srv):
    before = scrape(srv.url)
    with requests.post(srv.url + "/v1/chat/completions", stream=True, timeout=TIMEOUT,
                       json=chat_body("Count to a thousand.", max_tokens=4000, ignore_eos=True, stream=True)) as r:
        next(r.iter_content(chunk_size=None))  # the first event, then hang up
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        after = scrape(srv.url)
        if delta(before, after, "sagellm_request_outcome_total", outcome="cancelled") >= 1:
            break
        time.sleep(0.5)
    assert delta(before, after, "sagellm_request_outcome_total", outcome="cancelled") == 1
    assert delta(before, after, "vllm:request_success_total", finished_reason="abort") == 1
    assert delta(before, after, "tgi_request_success") == 0
    assert delta(before, after, "tgi_request_failure") == 0


def test_one_json_log_line_per_request_with_the_clients_request_id(srv):
    rid = f"req-{time.time_ns()}"
    r = requests.post(srv.url + "/v1/chat/completions", headers={"X-Request-Id": rid}, timeout=TIMEOUT,
                      json=chat_body(SECRET_WORDS, max_tokens=3, ignore_eos=True))
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    amzn = requests.post(srv.url + "/generate", headers={"X-Amzn-RequestId": rid + "-amzn"}, timeout=TIMEOUT,
                         json={"inputs": SECRET_WORDS, "parameters": {"max_new_tokens": 300, "top_p": 2}})
    assert amzn.status_code == 422 and amzn.headers["x-request-id"] == rid + "-amzn"
    generated = requests.post(srv.url + "/generate", timeout=TIMEOUT, json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert len(generated.headers["x-request-id"]) >= 16

    def lines(request_id: str) -> list[dict]:
        found = []
        for line in srv.log_path.read_text().splitlines():
            if "sagellm.request: {" in line:
                entry = json.loads(line.split("sagellm.request: ", 1)[1])
                if entry.get("id") == request_id:
                    found.append(entry)
        return found

    deadline = time.monotonic() + 10  # the line is written as the response closes
    while time.monotonic() < deadline and not (lines(rid) and lines(generated.headers["x-request-id"])):
        time.sleep(0.2)
    [ok] = lines(rid)
    assert ok["route"] == "/v1/chat/completions" and ok["status"] == 200 and ok["outcome"] == "success"
    assert ok["prompt_tokens"] == r.json()["usage"]["prompt_tokens"] and ok["generated_tokens"] == 3
    assert 0 < ok["ttft_ms"] <= ok["ms"]
    [refused] = lines(rid + "-amzn")
    assert refused["status"] == 422 and refused["outcome"] == "failure" and refused["generated_tokens"] == 0
    assert len(lines(generated.headers["x-request-id"])) == 1
    for word in SECRET_WORDS.split():
        assert word not in srv.log_path.read_text()
