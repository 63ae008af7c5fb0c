"""The scheduler's prefix sharing: a new request whose next uncached block another prompt of the
same step computes waits one step and takes it from the cache instead of computing it again."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sagellm.engine.kv_cache import PagedKVCache
from sagellm.engine.sampling_params import SamplingParams
from sagellm.engine.scheduler import Scheduler
from sagellm.engine.sequence import Sequence


def scheduler(prefix_caching: bool = True) -> Scheduler:
    cache = PagedKVCache(1, 64, 16, 1, 8, torch.float32, prefix_caching=prefix_caching)
    return Scheduler(cache, max_batch_size=16, max_prefill_tokens=512)


def seq(name: str, prompt: list[int], lora=None, **params) -> Sequence:
    return Sequence(name, prompt, SamplingParams(max_new_tokens=4, **params), None, lora)


def step(s: Scheduler) -> dict[str, tuple[int, int]]:
    """One step as the engine runs it: {request: (first token computed, tokens)}."""
    batch = s.schedule()
    sampled = batch.sampling
    done = {q.request_id: (q.num_computed, n) for q, n in batch.prefills}
    done.update({q.request_id: (q.num_computed, 1) for q in batch.decodes})
    for q, n in batch.prefills:
        q.num_computed += n
    for q in batch.decodes:
        q.num_computed += 1
    s.register_computed([q for q, _ in batch.prefills])
    for q in sampled:
        q.output_ids.append(7)
    return done


def test_requests_with_the_same_prompt_wait_a_step_for_its_blocks():
    prompt, other = list(range(50)), list(range(100, 150))
    s = scheduler()
    a, b, c, d = seq("a", prompt), seq("b", prompt), seq("c", prompt), seq("d", other)
    for q in (a, b, c, d):
        s.add(q)
    # b and c would compute the same three blocks as a: they wait; d, behind them, goes now.
    assert step(s) == {"a": (0, 50), "d": (0, 50)}
    assert [q.request_id for q in s.waiting] == ["b", "c"]
    # Next step they start from a's blocks (48 tokens) and compute the last 2.
    assert step(s) == {"a": (50, 1), "d": (50, 1), "b": (48, 2), "c": (48, 2)}
    assert s.prefix_hit_tokens == 96 and not s.waiting


def test_an_adapter_does_not_wait_for_another_adapters_blocks_nor_a_scored_prompt():
    prompt = list(range(40))
    s = scheduler()
    lora = SimpleNamespace(uid=1)
    s.add(seq("base", prompt))
    s.add(seq("lora", prompt, lora))  # other K/V: its own blocks
    s.add(seq("scored", prompt, prompt_logprobs=1))  # scores every position: computes them all
    s.add(seq("lora2", prompt, lora))
    assert step(s) == {"base": (0, 40), "lora": (0, 40), "scored": (0, 40)}
    assert step(s)["lora2"] == (32, 8)


def test_without_prefix_caching_nobody_waits():
    s = scheduler(prefix_caching=False)
    for name in "ab":
        s.add(seq(name, list(range(40))))
    assert step(s) == {"a": (0, 40), "b": (0, 40)}


def test_a_prompt_alone_takes_the_lone_budget_and_shares_the_step_budget_otherwise():
    cache = PagedKVCache(1, 512, 16, 1, 8, torch.float32)
    s = Scheduler(cache, max_batch_size=16, max_prefill_tokens=512, lone_prefill_tokens=2048)
    s.add(seq("alone", list(range(2000))))
    assert step(s) == {"alone": (0, 2000)}  # one chunk: nothing to starve
    s.add(seq("a", list(range(3000, 4000))))
    # Two sequences: the step budget of 512 again, the running decode first.
    assert step(s) == {"alone": (2000, 1), "a": (0, 512)}
    s.finish(s.running[0])
    assert step(s) == {"a": (512, 488)}  # alone again, mid-prompt: the rest in one chunk


def test_without_a_lone_budget_a_prompt_alone_goes_in_budget_chunks():
    s = scheduler(prefix_caching=False)
    s.add(seq("alone", list(range(600))))
    assert step(s) == {"alone": (0, 512)}


def test_the_lone_budget_applies_only_where_the_prefill_budget_is_derived():
    from sagellm.engine.builder import _engine_config
    from sagellm.engine.client import Limits
    from sagellm.engine.scheduler import LONE_PREFILL_TOKENS
    from sagellm.settings import Settings

    limits = Limits(4095, 4096, 512, 8192, 16)
    assert _engine_config(Settings(), limits).lone_prefill_tokens == LONE_PREFILL_TOKENS
    assert _engine_config(Settings(max_batch_prefill_tokens=512), limits).lone_prefill_tokens == 0
