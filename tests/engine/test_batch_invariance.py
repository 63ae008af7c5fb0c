"""BATCH_INVARIANT: in bf16 a greedy request's tokens are bitwise the same alone and among 16
different concurrent requests, whose prompts the prefill budget splits into chunks."""

from __future__ import annotations

import pytest
import torch

from sagellm.engine.engine import EngineConfig, LLMEngine
from sagellm.engine.sampling_params import SamplingParams
from sagellm.model.loader import load_weights
from sagellm.settings import Settings

TOPICS = ["the ocean", "volcanoes", "a city at night", "bread", "chess", "rain", "the moon", "trains",
          "gardens", "winter", "bees", "libraries", "rivers", "clocks", "mountains", "music"]
NEW_TOKENS = 48


def prompts(chat_ids) -> list[list[int]]:
    """16 different chat prompts of 37 to 157 tokens: with a 128-token prefill budget, the
    longer ones are chunked alone, and in the batch the chunks fall elsewhere."""
    out = []
    for i, topic in enumerate(TOPICS):
        detail = " Mention colours, sounds and one surprising fact." * (i % 5) * 3
        out.append(chat_ids(f"Write a short story about {topic}.{detail}"))
    return out


def run_engine(model, lm, ids: list[list[int]], prefix_caching: bool = False) -> tuple[list, list]:
    """(each prompt's tokens alone, one after the other; the same prompts all in flight together).
    With prefix caching the batch starts from the blocks the lone runs left."""
    engine = LLMEngine(model, lm.tokenizer, EngineConfig(max_batch_size=32, max_prefill_tokens=128,
                                                         max_total_tokens=1024, num_kv_blocks=1024,
                                                         prefix_caching=prefix_caching),
                       lm.eos_token_ids)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        alone = [[e.token_id for e in engine.submit(p, params)] for p in ids]
        handles = [engine.submit(p, params) for p in ids]  # all in flight together
        together = [[e.token_id for e in h] for h in handles]
    finally:
        engine.stop()
    return alone, together


@pytest.fixture(scope="module")
def bf16_invariant(loaded_model):
    return load_weights(loaded_model.source.path, Settings(dtype="bfloat16", batch_invariant=True), "cpu")


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_greedy_answers_do_not_depend_on_the_batch(bf16_invariant, loaded_model, chat_ids, prefix_caching):
    """Fails without BATCH_INVARIANT (measured: 9 of the 16 differ, from tokens 4 to 34)."""
    assert bf16_invariant.dtype == torch.bfloat16 and bf16_invariant.fast is not None
    ids = prompts(chat_ids)
    assert len({len(p) for p in ids}) > 4 and max(map(len, ids)) > 128
    alone, together = run_engine(bf16_invariant, loaded_model, ids, prefix_caching)
    assert all(len(a) == NEW_TOKENS for a in alone)
    differ = [i for i, (a, t) in enumerate(zip(alone, together)) if a != t]
    assert not differ, f"requests {differ} changed with the batch"
