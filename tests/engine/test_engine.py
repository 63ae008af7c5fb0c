"""The engine against transformers' own `generate` on the bundled model, and its cache bookkeeping."""

from __future__ import annotations

import time

import pytest
import torch

from sagellm.engine.engine import EngineConfig, LLMEngine
from sagellm.engine.events import FinishReason
from sagellm.engine.sampling_params import SamplingParams

from engine_setup import QUESTIONS, greedy, make_engine, reference, token_ids


@pytest.fixture(scope="module")
def engine(loaded_model):
    e = make_engine(loaded_model)
    yield e
    e.stop()



def test_greedy_equals_transformers_generate(chat_ids, loaded_model, reference_model, engine):
    for q in QUESTIONS[:3]:
        ids = chat_ids(q)
        assert token_ids(engine.submit(ids, greedy(32))) == reference(reference_model, ids, 32)


def test_bfloat16_greedy_follows_transformers_generate(chat_ids, loaded_model):
    """In bf16 a logit's last bit depends on the order of every sum (ours, transformers' and
    each kernel's differ), so two correct implementations part ways at a near tie. The engine's
    tokens must equal transformers' up to the first difference, and there the engine's token must
    be one transformers scored within two bf16 steps (0.25 nats at these logits) of its own."""
    from transformers import AutoModelForCausalLM

    from sagellm.model.loader import load_weights
    from sagellm.settings import Settings

    model = load_weights(loaded_model.source.path, Settings(dtype="bfloat16"), "cpu")
    ref = AutoModelForCausalLM.from_pretrained(loaded_model.source.path, dtype=torch.bfloat16).eval()
    engine = LLMEngine(model, loaded_model.tokenizer,
                       EngineConfig(max_batch_size=8, max_prefill_tokens=512, max_total_tokens=2048,
                                    num_kv_blocks=256), loaded_model.eos_token_ids)
    engine.start()
    agreed = 0
    try:
        for q in QUESTIONS[:4]:
            ids = chat_ids(q)
            got = token_ids(engine.submit(ids, greedy(24)))
            with torch.inference_mode():
                out = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                   output_scores=True, return_dict_in_generate=True)
            expected = out.sequences[0, len(ids):].tolist()
            n = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
            if n is None:
                assert got == expected
                agreed += 1
                continue
            logprobs = out.scores[n][0].float().log_softmax(-1)
            assert logprobs[expected[n]] - logprobs[got[n]] <= 0.25, (q, n, got[n], expected[n])
    finally:
        engine.stop()
    assert agreed >= 1  # and some agree all the way


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


def test_no_per_request_state_outlives_its_requests(chat_ids, loaded_model):
    """After 48 requests of every kind (greedy, sampled, stop strings, prompt logprobs, aborted
    while queued or midway), nothing per request is left: the memory soak's question
    (docs/reliability.md) asked as a count, not a size."""
    engine = make_engine(loaded_model, max_batch_size=8)
    try:
        kinds = [greedy(8), SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.9, seed=1),
                 greedy(12, stop=("e",)), greedy(4, prompt_logprobs=True), greedy(200, ignore_eos=True)]
        handles = []
        for i in range(48):
            h = engine.submit(chat_ids(QUESTIONS[i % len(QUESTIONS)] + f" ({i})"), kinds[i % len(kinds)])
            if i % 7 == 3:
                h.abort()  # most likely still queued
            handles.append(h)
        for i, h in enumerate(handles):
            events = iter(h)
            if i % len(kinds) == 4:  # 200 tokens asked: aborted after its first
                next(events, None)
                h.abort()
            rest = list(events)
            assert i % 7 == 3 or i % len(kinds) == 4 or rest[-1].finish_reason is not None
        deadline = time.monotonic() + 10
        while engine.num_pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine._by_id == {} and engine._prompt_logprobs == {}
        assert not engine._inbox and not engine.scheduler.waiting and not engine.scheduler.running
        alloc = engine.cache.allocator
        assert alloc.num_free == alloc.num_blocks and not any(alloc._refs)
        # What prefix caching keeps is bounded by the cache: blocks with a key, no more.
        assert len(alloc._key_of) == len(alloc._block_of) <= alloc.num_blocks
        assert len(engine.output._texts) <= loaded_model.tokenizer.vocab_size + 1000
    finally:
        engine.stop()


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


def test_seeded_sample_is_the_same_alone_and_in_a_batch(chat_ids, loaded_model, engine):
    """The draw is keyed by (seed, token index, token id), not by the batch: the same seeded
    request alone, and among 15 other requests of every kind (different prompts, greedy, penalties,
    other seeds, logprobs), gives the same tokens."""
    mine = [(chat_ids(q), SamplingParams(max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.95,
                                         seed=77 + i, ignore_eos=True)) for i, q in enumerate(QUESTIONS[:3])]
    alone = [token_ids(engine.submit(ids, p)) for ids, p in mine]
    kinds = [dict(), dict(do_sample=True, top_k=20, seed=5), dict(repetition_penalty=1.3, top_n_tokens=3),
             dict(do_sample=True, min_p=0.1, typical_p=0.9, frequency_penalty=0.5), dict(do_sample=True, temperature=1.4)]
    others = [(chat_ids(QUESTIONS[3 + i % 3] + " " * (i // 3)), SamplingParams(max_new_tokens=24 + i, **kinds[i % 5]))
              for i in range(13)]
    batch = others[:5] + mine + others[5:]
    handles = [engine.submit(ids, p) for ids, p in batch]
    together = [token_ids(h) for h in handles]
    assert together[5:8] == alone


def test_a_request_whose_row_cannot_be_sampled_fails_alone(chat_ids, loaded_model, engine):
    """A NaN temperature (the API refuses it; the engine must not trust that) leaves its row nothing
    to draw: that request ends with an error, the ones sharing its steps finish."""
    ids = chat_ids(QUESTIONS[0])
    bad = engine.submit(ids, SamplingParams(max_new_tokens=12, do_sample=True, temperature=float("nan")))
    good = [engine.submit(ids, greedy(12, ignore_eos=True)),
            engine.submit(ids, SamplingParams(max_new_tokens=12, do_sample=True, seed=3, ignore_eos=True))]
    events = list(bad)
    assert events[-1].finish_reason == FinishReason.ERROR and "no token could be sampled" in events[-1].error
    for h in good:
        events = list(h)
        assert len(events) == 12 and events[-1].finish_reason == FinishReason.LENGTH


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


# ---- prompt logprobs (TGI's decoder_input_details) ----


def test_prefix_cache_reuses_blocks_and_answers_as_without_it(chat_ids, loaded_model):
    system = "You are a careful assistant who answers in one short paragraph. " * 4
    prompts = [loaded_model.chat.encode(loaded_model.chat.render(
        [{"role": "system", "content": system}, {"role": "user", "content": q}])) for q in QUESTIONS[:3]]
    shared = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1])) if a != b)
    assert shared >= 48, shared  # at least three whole blocks in common
    cached = make_engine(loaded_model, prefix_caching=True)
    plain = make_engine(loaded_model, prefix_caching=False)
    try:
        expected = [token_ids(plain.submit(p, greedy(12))) for p in prompts]
        sched = cached.scheduler
        assert token_ids(cached.submit(prompts[0], greedy(12))) == expected[0]
        assert sched.prefix_hit_tokens == 0
        # Another question after the same system prompt: its whole shared blocks come from the cache.
        assert token_ids(cached.submit(prompts[1], greedy(12))) == expected[1]
        assert sched.prefix_hit_tokens == shared // 16 * 16
        # The same prompt again: every whole block but the one holding its last token.
        hits = sched.prefix_hit_tokens
        assert token_ids(cached.submit(prompts[0], greedy(12))) == expected[0]
        assert sched.prefix_hit_tokens - hits == (len(prompts[0]) - 1) // 16 * 16
        # Concurrent requests sharing the prefix, in one batch.
        handles = [cached.submit(p, greedy(12)) for p in prompts]
        assert [token_ids(h) for h in handles] == expected
        assert plain.scheduler.prefix_hit_tokens == 0
    finally:
        cached.stop()
        plain.stop()


def test_prefix_cache_under_cache_pressure_evicts_and_stays_exact(chat_ids, loaded_model):
    # 12 blocks: cached prefixes must be evicted for new requests, and preempted requests find
    # their own blocks again; every answer equals a roomy engine's without prefix caching.
    prompts = [chat_ids(q) for q in QUESTIONS] * 2
    small = make_engine(loaded_model, num_kv_blocks=12, max_total_tokens=180, prefix_caching=True)
    big = make_engine(loaded_model, prefix_caching=False)
    try:
        expected = [token_ids(big.submit(p, greedy(40, ignore_eos=True))) for p in prompts]
        handles = [small.submit(p, greedy(40, ignore_eos=True)) for p in prompts]
        assert [token_ids(h) for h in handles] == expected
        assert small.scheduler.prefix_hit_tokens > 0
        assert small.cache.allocator.num_free == 12
    finally:
        small.stop()
        big.stop()
