"""The lean decoder's stacked LoRA (sagellm.model.lora_stack) adds, to each fused projection, what
applying every adapter to its own rows one projection at a time adds (lora_step.LoraBatch.add,
the path transformers' modules take): adapters of different ranks and targets, base-model rows
between them, in float32 (plain matmuls) and bfloat16 (oneDNN-packed with fused post-ops), and
through the fused kernel (torch.ops.sagellm.lora_add) in both."""

from __future__ import annotations

import pytest
import torch

from sagellm.model import cpu_kernels, lora_stack
from sagellm.model.lora import LoraWeights
from sagellm.model.lora_step import LoraBatch, LoraGroup

HIDDEN, Q, KV, INTER, LAYERS = 64, 64, 16, 96, 2
OUTS = ((Q, KV, KV), (HIDDEN,), (INTER, INTER), (HIDDEN,))
SIZES = {"self_attn.q_proj": (HIDDEN, Q), "self_attn.k_proj": (HIDDEN, KV), "self_attn.v_proj": (HIDDEN, KV),
         "self_attn.o_proj": (Q, HIDDEN), "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER),
         "mlp.down_proj": (INTER, HIDDEN)}


def weights(name: str, rank: int, targets: list[str], layers: list[int], seed: int, dtype) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in layers:
        for proj in targets:
            d_in, d_out = SIZES[proj]
            modules[(layer, proj)] = (torch.randn(d_in, rank, generator=gen).to(dtype),
                                      torch.randn(rank, d_out, generator=gen).to(dtype))
    return LoraWeights(name, "/nowhere", rank, modules)


def in_fp32(w: LoraWeights) -> LoraWeights:
    return LoraWeights(w.name, w.path, w.rank, {k: (a.float(), b.float()) for k, (a, b) in w.modules.items()}, w.uid)


def grouped(batch: LoraBatch, y: torch.Tensor, x: torch.Tensor, layer: int, group: int) -> torch.Tensor:
    """The reference: each part of the fused output gets its projection's adapters, one by one."""
    y = y.clone()
    start = 0
    for part, width in zip(lora_stack.GROUPS[group], OUTS[group]):
        batch.add(y[:, start:start + width], x, layer, part)
        start += width
    return y


@pytest.fixture(scope="module")
def kernels():
    ops = cpu_kernels.load()
    assert ops is not None and hasattr(ops, "lora_add"), "the fused CPU kernels did not build"
    return ops


def check(step: lora_stack.StackedLora, batch: LoraBatch, t: int, dtype, base_rows: list[int]) -> int:
    """Every (layer, group) of `step` adds what each of batch's adapters alone adds in fp32 to its
    rows, and nothing to the base model's rows; returns how many (layer, group) it changed."""
    reference = LoraBatch([LoraGroup(in_fp32(g.weights), g.rows) for g in batch.groups])
    gen = torch.Generator().manual_seed(0)
    applied = 0
    for layer in range(LAYERS):
        for g, outs in enumerate(OUTS):
            d_in = SIZES[lora_stack.GROUPS[g][0]][0]
            x = torch.randn(t, d_in, generator=gen).to(dtype)
            y = torch.randn(t, sum(outs), generator=gen).to(dtype)
            want = grouped(reference, y.float(), x.float(), layer, g)
            got = step.apply(y.clone(), x, layer, g)
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
            else:  # the reference in fp32 on the same bf16 inputs: within bf16 rounding of s and y
                torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.6)
            for base_row in base_rows:
                assert torch.equal(got[base_row], y[base_row]), (layer, g)
            applied += not torch.equal(got, y)
    assert applied > 0
    return applied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_stack_of_the_resident_adapters_serves_every_subset_of_them(dtype, kernels):
    resident = [weights("attn", 4, ["self_attn.q_proj", "self_attn.v_proj"], [0, 1], 1, dtype),
                weights("all", 16, list(SIZES), [0, 1], 2, dtype),
                weights("mlp-layer1", 8, ["mlp.gate_proj", "mlp.down_proj"], [1], 3, dtype)]
    stacks = lora_stack.LoraStacks(LAYERS, OUTS, kernels)
    stacks.prepare(resident)  # at start-up, before any step
    (prepared,) = stacks._cache.values()
    t = 6
    for rows in ({2: [1, 4]}, {0: [0], 2: [3, 5]}, {1: [5], 0: [2, 3], 2: [0]}, {1: None}):
        batch = LoraBatch([LoraGroup(resident[i], None if r is None else torch.tensor(r)) for i, r in rows.items()],
                          tuple(resident))
        step = stacks.for_step(batch, t, dtype)
        assert step.stack is prepared and len(stacks._cache) == 1  # nothing built for a subset
        check(step, batch, t, dtype, [i for i in range(t) if all(r is not None and i not in r for r in rows.values())])
    # An adapter loaded, another unloaded: one new stack of the new resident set.
    loaded = weights("all-b", 8, list(SIZES), [0, 1], 4, dtype)
    now = (resident[1], resident[2], loaded)
    batch = LoraBatch([LoraGroup(loaded, torch.tensor([0, 1])), LoraGroup(resident[1], torch.tensor([4]))], now)
    step = stacks.for_step(batch, t, dtype)
    assert step.stack.uids == tuple(sorted(w.uid for w in now))
    check(step, batch, t, dtype, [2, 3, 5])
    assert stacks.for_step(LoraBatch([LoraGroup(resident[2], None)], now), 2, dtype).stack is step.stack
    # A step naming an adapter missing from its resident snapshot (swapped out since) still has it.
    batch = LoraBatch([LoraGroup(resident[0], torch.tensor([1])), LoraGroup(loaded, torch.tensor([2]))], now)
    step = stacks.for_step(batch, t, dtype)
    assert resident[0].uid in step.stack.uids
    check(step, batch, t, dtype, [0, 3, 4, 5])


def test_matmuls_stack_the_steps_adapters_only():
    # Masked matmuls spend compute on every stacked column of every row: no resident extras.
    resident = [weights(f"all{i}", 4, list(SIZES), [0, 1], i, torch.float32) for i in range(3)]
    stacks = lora_stack.LoraStacks(LAYERS, OUTS, None)
    stacks.prepare(resident)
    assert not stacks._cache
    batch = LoraBatch([LoraGroup(resident[1], torch.tensor([1]))], tuple(resident))
    step = stacks.for_step(batch, 3, torch.float32)
    assert step.stack.uids == (resident[1].uid,)
    check(step, batch, 3, torch.float32, [0, 2])


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_equals_each_adapter_on_its_rows(dtype, fused, request):
    adapters = [weights("attn", 4, ["self_attn.q_proj", "self_attn.v_proj"], [0, 1], 1, dtype),
                weights("all", 16, list(SIZES), [0, 1], 2, dtype),
                weights("mlp-layer1", 8, ["mlp.gate_proj", "mlp.down_proj"], [1], 3, dtype)]
    t = 11  # rows 0, 5 and 10 are the base model's
    rows = [[1, 4], [2, 3, 6, 7, 8], [9]]
    batch = LoraBatch([LoraGroup(w, torch.tensor(r)) for w, r in zip(adapters, rows)])
    stacks = lora_stack.LoraStacks(LAYERS, OUTS, request.getfixturevalue("kernels") if fused else None)
    assert (stacks.kernels is not None) == fused
    step = stacks.for_step(batch, t, dtype)
    applied = check(step, batch, t, dtype, [0, 5, 10])
    assert applied == LAYERS * len(OUTS)  # every (layer, group) has an adapter that targets it
    # The same set of adapters in another order reuses the stack.
    again = stacks.for_step(LoraBatch([LoraGroup(adapters[2], torch.tensor([0])),
                                       LoraGroup(adapters[0], None)]), 1, dtype)
    assert again.stack is not step.stack and len(stacks._cache) == 2
    assert stacks.for_step(LoraBatch(list(reversed(batch.groups))), t, dtype).stack is step.stack


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "kernel"])
def test_an_adapter_on_every_row(fused, request):
    w = weights("all", 4, list(SIZES), [0, 1], 5, torch.float32)
    stacks = lora_stack.LoraStacks(LAYERS, OUTS, request.getfixturevalue("kernels") if fused else None)
    step = stacks.for_step(LoraBatch([LoraGroup(w, None)]), 3, torch.float32)
    x, y = torch.randn(3, HIDDEN), torch.randn(3, Q + 2 * KV)
    a_q, b_q = w.modules[(0, "self_attn.q_proj")]
    got = step.apply(y.clone(), x, 0, lora_stack.QKV)
    torch.testing.assert_close(got[:, :Q], y[:, :Q] + x @ a_q @ b_q)


def test_a_long_prefill_split_over_threads_equals_each_adapter_alone(kernels):
    # 640 rows: lora_add's work is above the size it keeps on the calling thread (kInlineWork).
    adapters = [weights("all", 16, list(SIZES), [0, 1], 6, torch.float32),
                weights("attn", 8, ["self_attn.q_proj", "self_attn.o_proj"], [0, 1], 7, torch.float32)]
    t = 640
    rows = [torch.arange(0, 400), torch.arange(401, t)]  # row 400: the base model's
    batch = LoraBatch([LoraGroup(w, r) for w, r in zip(adapters, rows)], tuple(adapters))
    stacks = lora_stack.LoraStacks(LAYERS, OUTS, kernels)
    check(stacks.for_step(batch, t, torch.float32), batch, t, torch.float32, [400])


def test_steps_on_an_unchanged_resident_set_look_nothing_up(kernels, monkeypatch):
    # The registry hands out one tuple while its resident set stays: steps reuse the stack (and its
    # uid -> index map) without sorting, keying or searching the kept stacks.
    resident = tuple(weights(f"r{i}", 4, list(SIZES), [0, 1], 10 + i, torch.float32) for i in range(3))
    stacks = lora_stack.LoraStacks(LAYERS, OUTS, kernels)
    stacks.prepare(resident)
    (prepared,) = stacks._cache.values()

    def no_lookup(adapters):
        raise AssertionError("a stack looked up for an unchanged resident set")
    monkeypatch.setattr(stacks, "_stack", no_lookup)
    for rows in ({0: [1]}, {2: [0, 2], 1: [3]}, {1: None}):
        batch = LoraBatch([LoraGroup(resident[i], None if r is None else torch.tensor(r)) for i, r in rows.items()],
                          resident)
        step = stacks.for_step(batch, 4, torch.float32)
        assert step.stack is prepared
        check(step, batch, 4, torch.float32, [i for i in range(4) if all(r is not None and i not in r
                                                                          for r in rows.values())])
    monkeypatch.undo()
    now = resident[1:]  # one unloaded: a new snapshot, a new stack
    assert stacks.for_step(LoraBatch([LoraGroup(now[0], None)], now), 2, torch.float32).stack.uids == uids_of(now)


def uids_of(adapters) -> tuple[int, ...]:
    return tuple(sorted(w.uid for w in adapters))
