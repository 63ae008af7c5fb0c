"""The engine against transformers' own `generate` on the bundled model, and its cache bookkeeping."""

from __future__ import annotations

import time

import pytest
import torch

from sagellm.engine.engine import EngineConfig, LLMEngine
from sagellm.engine.events import FinishReason
from sagellm.engine.sampling_params import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Why is the sky blue?",
    "Explain photosynthesis in simple terms, with an example.",
    "How do bees make honey?",
    "What is a black hole?",
]


def make_engine(lm, **overrides) -> LLMEngine:
    cfg = dict(max_batch_size=32, max_prefill_tokens=512, max_total_tokens=2048, num_kv_blocks=1024)
    cfg.update(overrides)
    engine = LLMEngine(lm.model, lm.tokenizer, EngineConfig(**cfg), lm.eos_token_ids)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(loaded_model):
    e = make_engine(loaded_model)
    yield e
    e.stop()


def token_ids(handle) -> list[int]:
    return [e.token_id for e in handle if e.token_id >= 0]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kw)


def reference(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_greedy_equals_transformers_generate(chat_ids, loaded_model, reference_model, engine):
    for q in QUESTIONS[:3]:
        ids = chat_ids(q)
        assert token_ids(engine.submit(ids, greedy(32))) == reference(reference_model, ids, 32)


def test_bfloat16_greedy_equals_transformers_generate(chat_ids, loaded_model):
    from transformers import AutoModelForCausalLM

    from sagellm.model.loader import load_weights
    from sagellm.settings import Settings

    model = load_weights(loaded_model.source.path, Settings(dtype="bfloat16"), "cpu")
    ref = AutoModelForCausalLM.from_pretrained(loaded_model.source.path, dtype=torch.bfloat16).eval()
    engine = LLMEngine(model, loaded_model.tokenizer,
                       EngineConfig(max_batch_size=8, max_prefill_tokens=512, max_total_tokens=2048,
                                    num_kv_blocks=256), loaded_model.eos_token_ids)
    engine.start()
    try:
        for q in QUESTIONS[:2]:
            ids = chat_ids(q)
            assert token_ids(engine.submit(ids, greedy(24))) == reference(ref, ids, 24)
    finally:
        engine.stop()


def test_batched_equals_single_and_generate(chat_ids, loaded_model, reference_model, engine):
    prompts = [chat_ids(q) for q in QUESTIONS]
    expected = [reference(reference_model, p, 24) for p in prompts]
    handles = [engine.submit(p, greedy(24)) for p in prompts]  # all in one running batch
    assert [token_ids(h) for h in handles] == expected


def test_requests_join_a_running_batch(chat_ids, loaded_model, engine):
    prompts = [chat_ids(q) for q in QUESTIONS[:4]]
    single = [token_ids(engine.submit(p, greedy(20, ignore_eos=True))) for p in prompts]
    first = engine.submit(prompts[0], greedy(20, ignore_eos=True))
    events = iter(first)
    head = [next(events).token_id for _ in range(5)]  # the first request is mid-generation ...
    later = [engine.submit(p, greedy(20, ignore_eos=True)) for p in prompts[1:]]  # ... when these join
    assert head + [e.token_id for e in events] == single[0]
    assert [token_ids(h) for h in later] == single[1:]


def test_chunked_prefill_equals_unchunked(chat_ids, loaded_model):
    long_q = " ".join(QUESTIONS) * 4
    ids = chat_ids(long_q)
    assert len(ids) > 200
    chunked = make_engine(loaded_model, max_prefill_tokens=16)
    whole = make_engine(loaded_model, max_prefill_tokens=4096)
    try:
        assert token_ids(chunked.submit(ids, greedy(16))) == token_ids(whole.submit(ids, greedy(16)))
    finally:
        chunked.stop()
        whole.stop()


def test_aborted_request_frees_its_cache(chat_ids, loaded_model, engine):
    free_before = engine.cache.allocator.num_free
    handle = engine.submit(chat_ids(QUESTIONS[3]), greedy(500, ignore_eos=True))
    events = iter(handle)
    for _ in range(3):
        next(events)
    assert engine.cache.allocator.num_free < free_before
    handle.abort()
    rest = list(events)
    assert rest and rest[-1].finish_reason == FinishReason.ABORTED
    deadline = time.monotonic() + 5
    while engine.cache.allocator.num_free != free_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.cache.allocator.num_free == free_before


def test_full_cache_makes_requests_wait_not_crash(chat_ids, loaded_model):
    # 12 blocks of 16 tokens: one request of ~40 prompt + 60 new tokens needs 7 blocks, so six
    # of them cannot run at once; they must queue or be preempted and still answer exactly.
    prompts = [chat_ids(q) for q in QUESTIONS]
    small = make_engine(loaded_model, num_kv_blocks=12, max_total_tokens=180)
    big = make_engine(loaded_model)
    try:
        expected = [token_ids(big.submit(p, greedy(60, ignore_eos=True))) for p in prompts]
        handles = [small.submit(p, greedy(60, ignore_eos=True)) for p in prompts]
        assert [token_ids(h) for h in handles] == expected
        assert small.cache.allocator.num_free == 12
    finally:
        small.stop()
        big.stop()


def test_same_seed_same_output(chat_ids, loaded_model, engine):
    ids = chat_ids(QUESTIONS[1])
    p = SamplingParams(max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    runs = [token_ids(engine.submit(ids, p)) for _ in range(2)]
    assert runs[0] == runs[1]
    others = {tuple(token_ids(engine.submit(ids, SamplingParams(max_new_tokens=24, do_sample=True,
                                                                  temperature=1.5, seed=s))))
              for s in range(4)}
    assert len(others) > 1  # different seeds explore different continuations


def test_min_tokens_and_ignore_eos_give_exact_lengths(chat_ids, loaded_model, engine):
    ids = chat_ids(QUESTIONS[0])
    events = list(engine.submit(ids, greedy(40, min_new_tokens=40)))
    assert len(events) == 40 and events[-1].finish_reason == FinishReason.LENGTH


def test_stop_string_trims_content(chat_ids, loaded_model, engine):
    ids = chat_ids(QUESTIONS[0])
    plain = "".join(e.delta for e in engine.submit(ids, greedy(20)))
    assert "Paris" in plain
    events = list(engine.submit(ids, greedy(20, stop=("Paris",))))
    text = "".join(e.delta for e in events)
    assert events[-1].finish_reason == FinishReason.STOP_SEQUENCE and events[-1].stop_reason == "Paris"
    assert text == plain[:plain.index("Paris")]


def test_penalties_change_the_output(chat_ids, loaded_model, engine):
    ids = chat_ids("List the numbers from one to twenty, in words.")
    base = token_ids(engine.submit(ids, greedy(40, ignore_eos=True)))
    penalised = token_ids(engine.submit(ids, greedy(40, ignore_eos=True, frequency_penalty=2.0)))
    repeated = token_ids(engine.submit(ids, greedy(40, ignore_eos=True, repetition_penalty=1.8)))
    assert penalised != base and repeated != base
    # OpenAI's frequency penalty discourages repeats: fewer repeated tokens than greedy.
    assert len(set(penalised)) >= len(set(base))
