"""The last decoder layer, past its attention, runs only on the rows whose logits are read (each
step's sampled rows and prompt-logprob rows): the rest of a prompt's rows only feed the KV cache."""

from __future__ import annotations

import pytest
import torch

from sagellm.engine.engine import EngineConfig, LLMEngine
from sagellm.engine.sampling_params import SamplingParams
from sagellm.model.loader import load_weights
from sagellm.settings import Settings

QUESTIONS = ["Write a short story about the ocean." + " Mention colours, sounds and one surprising fact." * 6,
             "Name three rivers.", "What is a clock?" + " Explain it in detail, step by step." * 4, "Hi!"]


def run(model, lm, ids: list[list[int]], params: list[SamplingParams]) -> list[list]:
    """Each request's events, all in flight together; a 64-token prefill budget chunks the long prompts."""
    engine = LLMEngine(model, lm.tokenizer, EngineConfig(max_batch_size=16, max_prefill_tokens=64,
                                                         max_total_tokens=512, num_kv_blocks=256), lm.eos_token_ids)
    engine.start()
    try:
        return [list(h) for h in [engine.submit(p, s) for p, s in zip(ids, params)]]
    finally:
        engine.stop()


class _Rows:
    """Wraps a projection and records how many rows each call gets."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        return self.inner(x)


@pytest.fixture
def counted(loaded_model):
    fast = loaded_model.model.fast
    first, last = fast.layers[0], fast.layers[-1]
    saved = first.down, last.down
    first.down, last.down = _Rows(first.down), _Rows(last.down)
    yield first.down, last.down
    first.down, last.down = saved


def test_last_layer_runs_on_the_read_rows_only(loaded_model, chat_ids, counted):
    first, last = counted
    long = chat_ids(QUESTIONS[0])
    assert len(long) > 64
    events, = run(loaded_model.model, loaded_model, [long], [SamplingParams(max_new_tokens=3, ignore_eos=True)])
    assert len(events) == 3
    assert max(first.seen) == 64 and sum(first.seen) == len(long) + 2  # every prompt token, then 2 decodes
    assert last.seen == [1] * len(first.seen)  # one row a step: the last chunk's last row, or none read
    first.seen.clear(), last.seen.clear()
    short = chat_ids(QUESTIONS[1])
    events, = run(loaded_model.model, loaded_model, [short],
                  [SamplingParams(max_new_tokens=1, prompt_logprobs=True)])
    assert len(events[0].prompt_logprobs) == len(short)
    assert first.seen == [len(short)] and last.seen == [len(short)]  # every position scored


@pytest.fixture(scope="module")
def bf16_invariant(loaded_model):
    return load_weights(loaded_model.source.path, Settings(dtype="bfloat16", batch_invariant=True), "cpu")


def test_batch_invariant_rows_are_bitwise_those_of_the_whole_layer(bf16_invariant, loaded_model, chat_ids):
    """BATCH_INVARIANT promises a row's bits do not depend on its step; the trim must not change them."""
    ids = [chat_ids(q) for q in QUESTIONS]
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True, prompt_logprobs=(i == 3)) for i in range(len(ids))]

    def answers():
        out = run(bf16_invariant, loaded_model, ids, params)
        return [([(e.token_id, e.logprob) for e in events],
                 [p.logprob for p in events[0].prompt_logprobs or []]) for events in out]
    trimmed = answers()
    bf16_invariant.fast.trim_last_layer = False
    try:
        whole = answers()
    finally:
        bf16_invariant.fast.trim_last_layer = True
    assert all(len(tokens) == 12 for tokens, _ in trimmed) and len(trimmed[3][1]) == len(ids[3])
    assert trimmed == whole


@pytest.fixture(scope="module")
def bf16(loaded_model):
    return load_weights(loaded_model.source.path, Settings(dtype="bfloat16"), "cpu")


def test_last_layer_attention_for_the_read_rows_only(bf16, loaded_model, chat_ids, monkeypatch):
    """In bf16 on the flash kernel's path the last layer's attention, too, runs for the read rows
    alone: a chunk's last row as a one-query chunk over the rest. Same tokens, same logprobs."""
    from sagellm.model import attention, cpu_kernels, fast_decoder

    assert bf16.kernels is not None and cpu_kernels.has_bf16_dot()  # the machines this runs on have both
    made = []

    def recorded(*args):
        made.append(attention.last_rows_only(*args))
        return made[-1]
    monkeypatch.setattr(fast_decoder, "last_rows_only", recorded)
    ids = [chat_ids(q) for q in QUESTIONS]
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True, prompt_logprobs=(i == 3)) for i in range(len(ids))]

    def answers():
        out = run(bf16, loaded_model, ids, params)
        return [([e.token_id for e in events], [e.logprob for e in events],
                 [p.logprob for p in (events[0].prompt_logprobs or [None])[1:]]) for events in out]
    trimmed = answers()
    # Prefill steps: with the prompt-logprob rows the whole attention, else the last rows only.
    assert any(m is None for m in made) and sum(m is not None for m in made) >= 1
    assert all(m is None or len(m.prefills) <= 4 and all(c.q_len == 1 for c in m.prefills) for m in made)
    bf16.fast.trim_last_layer = False
    try:
        whole = answers()
    finally:
        bf16.fast.trim_last_layer = True
    for (tokens, logprobs, prompt), (tokens0, logprobs0, prompt0) in zip(trimmed, whole):
        assert tokens == tokens0 and len(tokens) == 12
        assert logprobs == pytest.approx(logprobs0, abs=0.02) and prompt == pytest.approx(prompt0, abs=0.02)


def test_a_step_that_reads_only_decode_rows_beside_a_prompts_middle_chunk(bf16, loaded_model, chat_ids):
    """A long prompt's middle chunks (no row read) beside running decodes: the trimmed last layer
    has no prefill chunk left, only the decode rows (this step used to fail: UnsupportedAttention)."""
    ids = [chat_ids("Hi!"), chat_ids(QUESTIONS[0] * 3)]  # the second: 4+ chunks of the 64-token budget
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True) for _ in ids]
    trimmed = [[e.token_id for e in events] for events in run(bf16, loaded_model, ids, params)]
    bf16.fast.trim_last_layer = False
    try:
        whole = [[e.token_id for e in events] for events in run(bf16, loaded_model, ids, params)]
    finally:
        bf16.fast.trim_last_layer = True
    assert len(ids[1]) > 3 * 64 and all(len(t) == 12 for t in trimmed) and trimmed == whole
