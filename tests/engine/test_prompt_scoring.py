"""Prompt scoring on the engine (prompt logprobs, scoring without generating, chunked and
preempted prompts) against transformers' own forward on the bundled model."""

from __future__ import annotations

import pytest
import torch

from sagellm.engine.engine import EngineConfig, LLMEngine
from sagellm.engine.events import FinishReason
from engine_setup import QUESTIONS, greedy, make_engine, reference, token_ids


@pytest.fixture(scope="module")
def engine(loaded_model):
    e = make_engine(loaded_model)
    yield e
    e.stop()


def reference_prompt_logprobs(model, ids: list[int]) -> list[float]:
    """log_softmax of transformers' own logits at position p, read at the prompt token p + 1."""
    with torch.inference_mode():
        logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [logprobs[p, ids[p + 1]].item() for p in range(len(ids) - 1)]


def prompt_logprobs(handle) -> list:
    events = list(handle)
    assert all(e.prompt_logprobs is None for e in events[1:])  # only on the first token's event
    return events[0].prompt_logprobs


def test_prompt_logprobs_equal_transformers(chat_ids, loaded_model, reference_model, engine):
    ids = chat_ids(QUESTIONS[2])
    got = prompt_logprobs(engine.submit(ids, greedy(4, prompt_logprobs=True)))
    assert [t.token_id for t in got] == ids
    assert [t.text for t in got] == [loaded_model.tokenizer.decode([i]) for i in ids]
    assert got[0].logprob is None  # the first token has no context
    want = reference_prompt_logprobs(reference_model, ids)
    assert max(abs(t.logprob - w) for t, w in zip(got[1:], want)) < 1e-3
    assert list(engine.submit(ids, greedy(4)))[0].prompt_logprobs is None  # only when asked


def test_prompt_scored_without_generating(chat_ids, loaded_model, reference_model, engine):
    """max_new_tokens 0 (OpenAI's echo with max_tokens 0): one event, no token, finish LENGTH,
    every prompt token's logprob and its 3 most likely alternatives as transformers has them."""
    ids = chat_ids(QUESTIONS[3])
    events = list(engine.submit(ids, greedy(0, prompt_logprobs=True, prompt_top_n=3)))
    assert len(events) == 1 and events[0].token_id == -1 and events[0].finish_reason == FinishReason.LENGTH
    got = events[0].prompt_logprobs
    assert [t.token_id for t in got] == ids and got[0].logprob is None and got[0].top_tokens == []
    with torch.inference_mode():
        want = reference_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [len(ids), vocab]
    top = want.topk(3, dim=-1)
    for p, t in enumerate(got[1:]):
        assert abs(t.logprob - want[p, ids[p + 1]].item()) < 1e-3
        assert [a.token_id for a in t.top_tokens] == top.indices[p].tolist()
        assert max(abs(a.logprob - v) for a, v in zip(t.top_tokens, top.values[p].tolist())) < 1e-3
        assert [a.text for a in t.top_tokens] == [loaded_model.tokenizer.decode([a.token_id]) for a in t.top_tokens]
        if t.token_id == t.top_tokens[0].token_id:  # the same float, so scorers can compare them
            assert t.logprob == t.top_tokens[0].logprob
    assert token_ids(engine.submit(ids, greedy(2))) == reference(reference_model, ids, 2)  # engine still fine


@pytest.fixture(scope="module")
def plain_transformers_model(loaded_model):
    """The bundled model under transformers' own modules with our paged attention: the forward
    the tensor-parallel ranks run (logits_to_keep), not the lean one."""
    from transformers import AutoModelForCausalLM

    from sagellm.model import attention
    from sagellm.model.forward import ModelForward

    attention.register()
    model = ModelForward(AutoModelForCausalLM.from_pretrained(loaded_model.source.path, dtype=loaded_model.dtype,
                                                              attn_implementation=attention.ATTN_IMPLEMENTATION).eval())
    assert model.fast is None
    return model


@pytest.mark.parametrize("forward", ["lean", "transformers"])
def test_chunked_prompt_logprobs_equal_unchunked(chat_ids, loaded_model, reference_model,
                                                 plain_transformers_model, forward):
    ids = chat_ids(" ".join(QUESTIONS) * 2)
    model = loaded_model.model if forward == "lean" else plain_transformers_model

    def run(max_prefill_tokens: int) -> list[float]:
        engine = LLMEngine(model, loaded_model.tokenizer,
                           EngineConfig(max_batch_size=8, max_prefill_tokens=max_prefill_tokens,
                                        max_total_tokens=2048, num_kv_blocks=256), loaded_model.eos_token_ids)
        engine.start()
        try:
            # Alongside a request that does not ask, so sampled and prompt rows share steps.
            other = engine.submit(chat_ids(QUESTIONS[0]), greedy(8))
            got = prompt_logprobs(engine.submit(ids, greedy(4, prompt_logprobs=True)))
            assert list(other)[0].prompt_logprobs is None
            return [t.logprob for t in got]
        finally:
            engine.stop()

    chunked, whole = run(16), run(4096)
    assert len(chunked) == len(whole) == len(ids) and chunked[0] is None and whole[0] is None
    assert max(abs(a - b) for a, b in zip(chunked[1:], whole[1:])) < 1e-4
    want = reference_prompt_logprobs(reference_model, ids)
    assert max(abs(a - w) for a, w in zip(chunked[1:], want)) < 1e-3


def test_scored_prompts_prefill_in_bounded_chunks(chat_ids, loaded_model):
    """Prompt logprobs keep a logits row per prompt token: the scheduler caps those rows per step
    (max_prompt_logprob_rows) even when the prefill budget would take the whole prompt, while an
    unscored prompt in the same steps still prefills at once. Without the prefix cache: the plain
    prompt would otherwise start from whatever blocks the scored one has finished by then."""
    ids = chat_ids(" ".join(QUESTIONS) * 2)
    engine = LLMEngine(loaded_model.model, loaded_model.tokenizer,
                       EngineConfig(max_batch_size=8, max_prefill_tokens=4096, max_total_tokens=2048,
                                    num_kv_blocks=256, prefix_caching=False), loaded_model.eos_token_ids)
    engine.scheduler.max_prompt_logprob_rows = 32
    chunks = []
    real_schedule = engine.scheduler.schedule

    def recording():
        batch = real_schedule()
        chunks.extend((s.params.prompt_logprobs, n) for s, n in batch.prefills)
        return batch
    engine.scheduler.schedule = recording
    engine.start()
    try:
        scored = engine.submit(ids, greedy(2, prompt_logprobs=True))
        plain = engine.submit(ids, greedy(2))
        got = prompt_logprobs(scored)
        list(plain)
    finally:
        engine.stop()
    assert len(got) == len(ids) and all(t.logprob is not None for t in got[1:])
    assert max(n for wanted, n in chunks if wanted) == 32
    assert sum(n for wanted, n in chunks if wanted) == len(ids)
    assert [n for wanted, n in chunks if not wanted] == [len(ids)]


def test_preempted_requests_report_prompt_logprobs_once(chat_ids, loaded_model, reference_model, monkeypatch):
    # As in test_full_cache_makes_requests_wait_not_crash: too few blocks, so requests are
    # preempted and their prompt (and output so far) prefilled again, some in the middle of a
    # chunked prefill and some after their first token.
    from sagellm.engine.scheduler import Scheduler

    preempted_outputs = []
    preempt = Scheduler._preempt

    def spy(self, seq, batch):
        preempted_outputs.append(len(seq.output_ids))
        preempt(self, seq, batch)

    monkeypatch.setattr(Scheduler, "_preempt", spy)
    prompts = [chat_ids(q) for q in QUESTIONS]
    small = make_engine(loaded_model, num_kv_blocks=12, max_total_tokens=180, max_prefill_tokens=16)
    try:
        handles = [small.submit(p, greedy(60, ignore_eos=True, prompt_logprobs=True)) for p in prompts]
        results = [prompt_logprobs(h) for h in handles]
    finally:
        small.stop()
    assert 0 in preempted_outputs and max(preempted_outputs) > 0
    for ids, got in zip(prompts, results):
        assert [t.token_id for t in got] == ids
        want = reference_prompt_logprobs(reference_model, ids)
        assert max(abs(t.logprob - w) for t, w in zip(got[1:], want)) < 1e-3
