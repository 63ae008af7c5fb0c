"""The EngineClient over our own engine, as build_engine makes it for the server: generation,
abort, health, stats, the text side, limits and model info, on the bundled model."""

from __future__ import annotations

import time

import pytest

from sagellm.engine.builder import build_engine
from sagellm.engine.client import EngineClient, EngineDead, Health, Limits, RequestStream
from sagellm.engine.events import FinishReason
from sagellm.engine.sampling_params import SamplingParams
from sagellm.errors import ValidationError
from sagellm.model.bundled import NAME
from sagellm.settings import Settings

SETTINGS = Settings(dtype="float32", max_total_tokens=1024, max_batch_total_tokens=4096, max_batch_size=8)


@pytest.fixture(scope="module")
def client():
    c = build_engine(SETTINGS)
    yield c
    c.shutdown()


def test_it_is_an_engine_client_with_the_limits_and_model_it_serves(client):
    assert isinstance(client, EngineClient)
    assert client.limits == Limits(max_input_tokens=1023, max_total_tokens=1024, max_batch_prefill_tokens=512,
                                   max_batch_total_tokens=4096, max_batch_size=8)
    assert (client.model.model_id, client.model.served_name) == (NAME, NAME)
    assert (client.model.device, client.model.dtype) == ("cpu", "float32")


def test_submit_streams_typed_events_until_the_finish(client):
    ids = client.encode_chat(client.render_chat([{"role": "user", "content": "What is the capital of France?"}]))
    stream = client.submit(ids, SamplingParams(max_new_tokens=12, ignore_eos=True), request_id="req-1")
    assert isinstance(stream, RequestStream)
    assert (stream.request_id, stream.prompt_len, stream.seed) == ("req-1", len(ids), None)
    events = list(stream)
    assert [e.index for e in events] == list(range(1, 13))
    assert events[-1].finish_reason == FinishReason.LENGTH and all(e.finish_reason is None for e in events[:-1])
    assert "".join(e.delta for e in events) == client.decode([e.token_id for e in events])


def test_a_sampled_request_reports_the_seed_it_drew(client):
    stream = client.submit(client.tokenize("Once upon a time"), SamplingParams(max_new_tokens=2, do_sample=True))
    assert isinstance(stream.seed, int)
    again = client.submit(client.tokenize("Once upon a time"),
                          SamplingParams(max_new_tokens=2, do_sample=True, seed=stream.seed))
    assert [e.token_id for e in stream] == [e.token_id for e in again]


def test_abort_ends_the_request_and_frees_its_blocks(client):
    stream = client.submit(client.tokenize("Count to a thousand:"), SamplingParams(max_new_tokens=500, ignore_eos=True))
    events = stream.iter_events()
    next(events), next(events)
    assert client.stats().kv_blocks_used > 0
    client.abort(stream.request_id)
    assert list(events)[-1].finish_reason == FinishReason.ABORTED
    deadline = time.monotonic() + 5
    while client.stats().kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.stats().kv_blocks_used == 0


def test_stats_count_steps_phases_and_the_cache(client):
    before = client.stats()
    list(client.submit(client.tokenize("Hello there"), SamplingParams(max_new_tokens=4, ignore_eos=True)))
    after = client.stats()
    assert after.num_steps >= before.num_steps + 4
    assert set(after.phase_seconds) == {"schedule", "prepare", "forward", "sample", "output"}
    assert after.phase_seconds["forward"] > before.phase_seconds["forward"]
    assert after.prefix_query_tokens > before.prefix_query_tokens
    assert (after.num_waiting, after.num_running) == (0, 0)
    assert after.kv_blocks_total == 4096 // 16


def test_the_text_side(client):
    tok = client.tokenizer
    assert client.tokenize("Hello world") == tok("Hello world").input_ids
    spans = client.tokenize_with_offsets("Hello world")
    assert [s.token_id for s in spans] == tok("Hello world").input_ids
    assert "".join("Hello world"[s.start:s.end] for s in spans) == "Hello world"
    prompt = client.render_chat([{"role": "user", "content": "Hi"}])
    assert "Hi" in prompt and client.encode_chat(prompt) == tok(prompt, add_special_tokens=False).input_ids
    assert client.template_shows_tools is False
    assert client.supports_grammar
    grammar = client.compile_grammar("regex", "[0-9]+", "grammar")
    assert grammar.description == "regex" and "[0-9]+" in grammar.source
    out = list(client.submit(client.tokenize("The answer is"), SamplingParams(max_new_tokens=6, grammar=grammar)))
    assert "".join(e.delta for e in out).isdigit()
    with pytest.raises(ValidationError, match="`grammar`"):
        client.compile_grammar("regex", "(", "grammar")


def test_health_reports_a_stall_and_a_dead_engine():
    c = build_engine(SETTINGS.replace(disable_grammar_support=True, watchdog_timeout_s=1.0))
    try:
        assert c.health() == Health(True, True)
        assert not c.supports_grammar
        with pytest.raises(ValidationError, match="DISABLE_GRAMMAR_SUPPORT"):
            c.compile_grammar("regex", "a", "response_format")
        c.engine.stop()  # the loop thread ends: queued work can make no progress
        c.engine.is_alive = lambda: True
        c.engine.submit(c.tokenize("Hello"), SamplingParams(max_new_tokens=2))
        c.engine.last_progress -= 5
        health = c.health()
        assert (health.alive, health.progressing) == (True, False) and "no progress for" in health.reason
    finally:
        c.shutdown()
    del c.engine.is_alive
    health = c.health()
    assert not health.ok and health.reason == "the engine stopped"
    with pytest.raises(EngineDead):
        c.submit(c.tokenize("Hello"), SamplingParams(max_new_tokens=2))
