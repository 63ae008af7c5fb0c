"""TGI's native details against the real server: prompt logprobs (`decoder_input_details`) checked
against transformers' own forward, and `best_of`, through plain HTTP and the `text_generation` client."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
import requests
import torch

from helpers import post

PROMPT = "The capital of France is Paris, and the capital of Germany is"
SAMPLING = {"do_sample": True, "temperature": 0.9, "max_new_tokens": 8, "details": True}


def mean_logprob(seq: dict) -> float:
    return sum(t["logprob"] for t in seq["tokens"]) / len(seq["tokens"])


def generate(server, path: str = "/generate", **parameters) -> dict:
    r = post(server, path, {"inputs": PROMPT, "parameters": parameters})
    assert r.status_code == 200, r.text
    return r.json()


def validation_error(r) -> str:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_type"] == "validation"
    return body["error"]


# ---- decoder_input_details ----

def test_prefill_is_every_prompt_token_scored_as_transformers_does(server, loaded_model, reference_model):
    ids = loaded_model.tokenizer(PROMPT).input_ids
    out = generate(server, max_new_tokens=4, decoder_input_details=True)
    prefill = out["details"]["prefill"]  # decoder_input_details implies details
    assert [t["id"] for t in prefill] == ids
    assert [t["text"] for t in prefill] == [loaded_model.tokenizer.decode([i]) for i in ids]
    assert prefill[0]["logprob"] is None and set(prefill[0]) == {"id", "text", "logprob"}
    with torch.inference_mode():
        logprobs = reference_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for p, entry in enumerate(prefill[1:]):
        assert abs(entry["logprob"] - logprobs[p, ids[p + 1]].item()) < 1e-3, (p, entry)


def test_prefill_is_empty_unless_asked(server):
    assert generate(server, max_new_tokens=4, details=True)["details"]["prefill"] == []


def test_prefill_on_invocations_native_body(server):
    r = post(server, "/invocations", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2,
                                                                       "decoder_input_details": True}})
    assert r.status_code == 200, r.text
    prefill = r.json()[0]["details"]["prefill"]
    assert prefill[0]["logprob"] is None and all(t["logprob"] <= 0 for t in prefill[1:])


@pytest.mark.parametrize("path, body", [
    ("/generate_stream", {"inputs": PROMPT, "parameters": {"decoder_input_details": True}}),
    ("/invocations", {"inputs": PROMPT, "stream": True, "parameters": {"decoder_input_details": True}}),
])
def test_prefill_details_refused_on_streams(server, path, body):
    assert "`decoder_input_details`" in validation_error(post(server, path, body))


# ---- best_of ----

def test_best_of_returns_the_best_mean_logprob_and_the_others(server):
    out = generate(server, best_of=2, decoder_input_details=True, **SAMPLING)
    details = out["details"]
    others = details["best_of_sequences"]
    assert len(others) == 1
    other = others[0]
    assert set(other) == {"generated_text", "finish_reason", "generated_tokens", "seed", "prefill", "tokens"}
    assert other["generated_tokens"] == len(other["tokens"]) and other["prefill"] == details["prefill"]
    assert other["seed"] is not None and other["seed"] != details["seed"]
    # TGI's rule: the winner has the highest mean token logprob.
    assert mean_logprob(details) >= mean_logprob(other)
    assert out["generated_text"] and other["generated_text"]


def test_best_of_with_a_seed_uses_seed_and_the_next(server):
    def by_seed() -> dict[int, list[int]]:
        d = generate(server, best_of=2, seed=41, **SAMPLING)["details"]
        return {s["seed"]: [t["id"] for t in s["tokens"]] for s in (d, *d["best_of_sequences"])}

    first = by_seed()
    assert sorted(first) == [41, 42]
    assert by_seed() == first  # reproducible


def test_best_of_sequences_need_details(server):
    out = generate(server, best_of=2, do_sample=True, max_new_tokens=4)
    assert "details" not in out and out["generated_text"]


def test_best_of_sequences_carry_the_prompt_on_invocations(server):
    r = post(server, "/invocations", {"inputs": PROMPT, "parameters": {"best_of": 2, **SAMPLING}})
    assert r.status_code == 200, r.text
    out = r.json()[0]
    assert out["generated_text"].startswith(PROMPT)  # return_full_text defaults to true here
    assert out["details"]["best_of_sequences"][0]["generated_text"].startswith(PROMPT)


@pytest.mark.parametrize("parameters, words", [
    ({"best_of": 3, "do_sample": True}, ["`best_of`", "<= 2", "Given: 3", "MAX_BEST_OF"]),
    ({"best_of": 0, "do_sample": True}, ["`best_of`", "> 0"]),
    ({"best_of": 2}, ["you must use sampling", "`best_of`"]),
    ({"best_of": 2, "do_sample": False}, ["you must use sampling"]),
    ({"best_of": 2, "temperature": 0}, ["you must use sampling"]),
])
def test_bad_best_of_is_422(server, parameters, words):
    message = validation_error(post(server, "/generate", {"inputs": PROMPT, "parameters": parameters}))
    assert all(w in message for w in words), message


def test_a_warper_counts_as_sampling_for_best_of(server):
    # text_generation sends do_sample=false unless told; TGI still samples when a warper is set.
    details = generate(server, best_of=2, do_sample=False, temperature=0.8, max_new_tokens=4,
                       details=True)["details"]
    assert details["seed"] is not None and len(details["best_of_sequences"]) == 1


@pytest.mark.parametrize("path, body", [
    ("/generate_stream", {"inputs": PROMPT, "parameters": {"best_of": 2, "do_sample": True}}),
    ("/", {"inputs": PROMPT, "stream": True, "parameters": {"best_of": 2, "do_sample": True}}),
])
def test_best_of_refused_on_streams(server, path, body):
    message = validation_error(post(server, path, body))
    assert "`best_of`" in message and "streaming" in message


# ---- the text_generation client ----

def test_text_generation_client_best_of_with_prefill_details(server):
    text_generation = pytest.importorskip("text_generation")
    client = text_generation.Client(server.url, timeout=300)
    # (the client always sends details: true)
    r = client.generate(PROMPT, max_new_tokens=6, decoder_input_details=True, best_of=2, do_sample=True)
    d = r.details
    assert d.prefill[0].logprob is None and all(t.logprob is not None for t in d.prefill[1:])
    assert len(d.best_of_sequences) == 1
    other = d.best_of_sequences[0]
    assert [t.id for t in other.prefill] == [t.id for t in d.prefill]
    assert other.generated_tokens == len(other.tokens)
    mean = [sum(t.logprob for t in s.tokens) / len(s.tokens) for s in (d, other)]
    assert mean[0] >= mean[1]


def test_best_of_client_gone_aborts_every_sequence(server):
    """A client that hangs up on a best_of request frees all its sequences, not only the one
    being read."""
    def batch_size() -> int:
        metrics = requests.get(server.url + "/metrics", timeout=10).text
        return int(float(re.search(r"^tgi_batch_current_size (\S+)$", metrics, re.M).group(1)))

    room = requests.get(server.url + "/info", timeout=10).json()["max_total_tokens"] - 50
    body = json.dumps({"inputs": PROMPT, "parameters": {"best_of": 2, "do_sample": True, "ignore_eos": True,
                                                        "max_new_tokens": min(room, 4000)}}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 60
        while batch_size() < 2:
            assert time.monotonic() < deadline, "the two sequences never ran together"
            time.sleep(0.1)
    t0 = time.monotonic()
    while batch_size():
        assert time.monotonic() - t0 < 15, "sequences still running after the client left"
        time.sleep(0.1)
