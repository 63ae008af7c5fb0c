"""Hugging Face clients against the real server: huggingface_hub.InferenceClient and TGI's own
`text_generation` client (which talks to POST / with {"inputs", "parameters", "stream"})."""

from __future__ import annotations

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")
text_generation = pytest.importorskip("text_generation")

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def server(engine_server):
    """This suite runs on both engines (conftest.engine_server): ours, then vLLM."""
    return engine_server


@pytest.fixture(scope="module")
def tgi(server):
    return text_generation.Client(server.url, timeout=300)


# ---- InferenceClient.chat_completion ----

def test_hub_chat_completion(hub):
    r = hub.chat_completion(MESSAGES, max_tokens=16, temperature=0)
    assert len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_hub_chat_completion_stream(hub):
    ref = hub.chat_completion(MESSAGES, max_tokens=16, temperature=0)
    chunks = list(hub.chat_completion(MESSAGES, max_tokens=16, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == ref.choices[0].message.content
    assert finishes == [ref.choices[0].finish_reason]


# ---- InferenceClient.text_generation ----

def test_hub_text_generation(hub):
    # the hub posts to the base URL (POST /), where return_full_text defaults to true (TGI/SageMaker)
    full = hub.text_generation(PROMPT, max_new_tokens=8, do_sample=False)
    new = hub.text_generation(PROMPT, max_new_tokens=8, do_sample=False, return_full_text=False)
    assert isinstance(new, str) and new.strip()
    assert not new.startswith(PROMPT)
    assert full == PROMPT + new


def test_hub_text_generation_details(hub):
    r = hub.text_generation(PROMPT, max_new_tokens=8, do_sample=False, details=True)
    d = r.details
    assert d.finish_reason in ("length", "eos_token", "stop_sequence")
    assert d.generated_tokens == len(d.tokens)
    assert 1 <= d.generated_tokens <= 8
    if d.finish_reason == "length":
        assert d.generated_tokens == 8
    # generated_text ends with the decoded non-special tokens (the hub may prepend the prompt)
    assert r.generated_text.endswith("".join(t.text for t in d.tokens if not t.special))


def test_hub_text_generation_stream(hub):
    ref = hub.text_generation(PROMPT, max_new_tokens=8, do_sample=False, details=True)
    tokens = list(hub.text_generation(PROMPT, max_new_tokens=8, do_sample=False, stream=True))
    assert tokens and all(isinstance(t, str) for t in tokens)
    assert tokens == [t.text for t in ref.details.tokens]


def test_hub_text_generation_stream_details(hub):
    ref = hub.text_generation(PROMPT, max_new_tokens=8, do_sample=False, details=True)
    events = list(hub.text_generation(PROMPT, max_new_tokens=8, do_sample=False, stream=True, details=True))
    assert [e.index for e in events] == list(range(1, len(events) + 1))
    assert all(e.generated_text is None for e in events[:-1])
    final = events[-1]
    assert final.generated_text is not None
    assert final.generated_text == ref.generated_text
    assert final.details is not None
    assert final.details.generated_tokens == len(events)
    assert final.details.finish_reason == ref.details.finish_reason


# ---- text_generation.Client (TGI's own) ----

def test_tgi_client_generate(tgi):
    r = tgi.generate(PROMPT, max_new_tokens=8)  # the client sends parameters -> greedy
    assert r.generated_text
    d = r.details
    assert d is not None and d.tokens
    assert d.generated_tokens == len(d.tokens)
    assert d.finish_reason.value in ("length", "eos_token", "stop_sequence")
    assert d.seed is None  # greedy
    assert r.generated_text.endswith("".join(t.text for t in d.tokens if not t.special))


def test_tgi_client_generate_stream_matches_generate(tgi):
    ref = tgi.generate(PROMPT, max_new_tokens=8)
    responses = list(tgi.generate_stream(PROMPT, max_new_tokens=8))
    assert responses
    assert all(r.generated_text is None for r in responses[:-1])
    final = responses[-1]
    assert final.generated_text == ref.generated_text
    assert [r.token.id for r in responses] == [t.id for t in ref.details.tokens]
    assert final.details is not None and final.details.generated_tokens == len(responses)
