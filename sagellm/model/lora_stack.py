"""LoRA in the lean decoder: the adapters of one step stacked per (layer, fused projection), so each
of the decoder's four fused projections (q/k/v, o, gate/up, down) gains its adapters' share in two
operators for every row at once, whatever mix of adapters and base-model rows the step holds.

For one fused projection with inputs x [T, in] and base output y [T, out] (q|k|v or gate|up side
by side), the step's adapters' A matrices are concatenated into A [R, in] (R = the sum of their
ranks over the projection's parts, no padding) and their B into one block-diagonal B [out, R]:

    s = (x @ A^T) * mask      mask [T, R]: 1 where column c belongs to row t's adapter, else 0
    y = y + s @ B^T           (base rows have an all-zero mask row, so they gain exactly 0)

Measured (bench/lora.py, docs/performance.md): adding each adapter's rows separately per
projection (an index_select, two matmuls and an index_add each) made 840 small operator groups a
step for 4 adapters on SmolLM2 and ran at 0.18x the base model's throughput; this is 8 operators
a layer whatever the number of adapters. In bf16 on CPU both matmuls are oneDNN-packed with the
mask product and the addition as fused post-ops (_linear_pointwise.binary): 2 calls instead of 5.
The masked columns of other adapters cost compute (T x R instead of T x r per row), small while R
is small next to the base weights' width.

With the fused CPU kernels, torch.ops.sagellm.lora_add (csrc/lora.cpp) does both in one call, each
row reading only its own adapter's columns and output ranges: measured in a served step, the
oneDNN calls above cost 40-130 us each, mostly per-call overhead (docs/performance.md).

With the fused kernel, where a row reads only its own adapter's columns, one stack holds every
resident adapter (the step's LoraBatch.resident) and serves every step until that set changes: built
per distinct set of adapters in a step instead, a burst of requests on 4 adapters built a stack for
each set they arrived in, 23-70 ms each (bench/lora.py). With the masked matmuls, where every
stacked column costs compute on every row, a stack holds the step's adapters only. LoraStacks keeps
the last few built.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from sagellm.model import cpu_linear

# The lean decoder's fused projections, each a tuple of the parts side by side in its output.
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
QKV, O, GATE_UP, DOWN = range(len(GROUPS))
CACHED = 4  # stacks kept (distinct sets of adapters in a step); each holds a copy of its adapters
CACHED_RESIDENT = 2  # the same, for stacks of the resident adapters (the last set, and the one before)


class _Matrix:
    """x @ W^T with a fused elementwise post-op; W [out, in]."""

    def __init__(self, weight: torch.Tensor):
        self.packed = None
        if weight.device.type == "cpu" and cpu_linear.available(weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        else:
            self.wt = weight.t().contiguous()  # [in, out]

    def times_mask(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(x @ W^T) * mask -> [T, out]."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, mask, self.packed, None, "mul")
        return torch.mm(x, self.wt).mul_(mask)

    def plus(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + x @ W^T -> a new [T, out] tensor; y contiguous."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, y, self.packed, None, "add")
        return torch.addmm(y, x, self.wt)


class _Kernel:
    """The same through torch.ops.sagellm.lora_add: a [R, in], b_rows [R, out] (B transposed),
    col_out [R, 2]: the output range of each column."""

    def __init__(self, kernels, a: torch.Tensor, big_b: torch.Tensor, col_out: list[tuple[int, int]]):
        self.kernels, self.a, self.b = kernels, a.contiguous(), big_b.t().contiguous()
        self.col_out = torch.tensor(col_out, dtype=torch.long)


class LoraStack:
    """Adapters (a list of sagellm.model.lora.LoraWeights) stacked for every (layer, group)."""

    def __init__(self, adapters: list, num_layers: int, group_outs: tuple[tuple[int, ...], ...], kernels=None):
        """group_outs[g]: the output width of each part of GROUPS[g] (q, k, v sizes...);
        kernels: torch.ops.sagellm (lora_add), or None: oneDNN / torch matmuls."""
        self.uids = tuple(w.uid for w in adapters)
        self.index = {uid: i for i, uid in enumerate(self.uids)}  # uid -> its adapter's index
        layouts: dict[tuple[int, ...], int] = {}  # column owners (adapter index per column) -> id
        self.entries: dict[tuple[int, int], tuple[object, object, int]] = {}
        for layer in range(num_layers):
            for g, parts in enumerate(GROUPS):
                outs = group_outs[g]
                starts = [sum(outs[:j]) for j in range(len(outs))]
                a_cols, b_cols, owner, col_out = [], [], [], []
                for i, w in enumerate(adapters):
                    for j, part in enumerate(parts):
                        ab = w.modules.get((layer, part))
                        if ab is None:
                            continue
                        a, b = ab  # [in, r], [r, out_j] (scaled)
                        a_cols.append(a)
                        b_cols.append((starts[j], b))
                        owner += [i] * a.shape[1]
                        col_out += [(starts[j], starts[j] + outs[j])] * a.shape[1]
                if not a_cols:
                    continue
                a = torch.cat(a_cols, dim=1).t()  # [R, in]
                big_b = a.new_zeros(sum(outs), a.shape[0])  # [out, R], block-diagonal
                col = 0
                for start, b in b_cols:
                    big_b[start:start + b.shape[1], col:col + b.shape[0]] = b.t()
                    col += b.shape[0]
                layout = layouts.setdefault(tuple(owner), len(layouts))
                if kernels is not None:
                    self.entries[(layer, g)] = (_Kernel(kernels, a, big_b, col_out), None, layout)
                else:
                    self.entries[(layer, g)] = (_Matrix(a), _Matrix(big_b), layout)
        device = adapters[0].modules[next(iter(adapters[0].modules))][0].device
        self.owners = [torch.tensor(o, dtype=torch.long, device=device) for o in layouts]
        # Per layout, each adapter's column range, row 0 for the base model (empty):
        # ranges[l][i + 1] = (first, end) of adapter i's columns (they are contiguous).
        self.ranges = []
        for o in layouts:
            spans = [(0, 0)] * (len(adapters) + 1)
            for i in set(o):
                spans[i + 1] = (o.index(i), len(o) - o[::-1].index(i))
            self.ranges.append(torch.tensor(spans, dtype=torch.long, device=device))


class StackedLora:
    """One step's adapters over its rows: apply() adds their share to a fused projection."""

    def __init__(self, stack: LoraStack, row_adapter: torch.Tensor, dtype: torch.dtype):
        """row_adapter [T]: each row's index in the stack's adapters, -1 for the base model."""
        self.stack = stack
        if stack.entries and isinstance(next(iter(stack.entries.values()))[0], _Kernel):
            # Per distinct column layout, each row's column range [T, 2] (lora_add).
            self.masks = [r.index_select(0, row_adapter + 1) for r in stack.ranges]
        else:  # one mask per distinct column layout, [T, R] in the model dtype
            self.masks = [(row_adapter[:, None] == owner[None, :]).to(dtype) for owner in stack.owners]

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: int) -> torch.Tensor:
        """y [T, out] (the fused projection's base output, contiguous), x [T, in] its input ->
        y plus the adapters' share on their rows (a new tensor; y itself when none applies)."""
        entry = self.stack.entries.get((layer, group))
        if entry is None:
            return y
        a, b, layout = entry
        if b is None:  # the fused kernel, in place (it takes whole rows: contiguous, a no-op here)
            return a.kernels.lora_add(y.contiguous(), x.contiguous(), a.a, a.b, self.masks[layout], a.col_out)
        return b.plus(a.times_mask(x, self.masks[layout]), y)


class LoraStacks:
    """The last stacks built, by the set of adapters (their load uids)."""

    def __init__(self, num_layers: int, group_outs: tuple[tuple[int, ...], ...], kernels=None):
        self.num_layers, self.group_outs = num_layers, group_outs
        # lora_add needs every width a multiple of 16 (whole AVX-512 registers)
        fits = all(w % 16 == 0 for outs in group_outs for w in outs)
        self.kernels = kernels if fits and kernels is not None and hasattr(kernels, "lora_add") else None
        self._cache: OrderedDict[tuple[int, ...], LoraStack] = OrderedDict()
        # With the fused kernel: the resident set last seen (the registry's snapshot, a new tuple
        # only when the set changes) and its stack, so a step looks up nothing while it stays.
        self._resident: tuple | None = None
        self._resident_stack: LoraStack | None = None

    def _stack(self, adapters: list) -> LoraStack:
        """The stack of `adapters` (sorted by uid), built if not kept."""
        key = tuple(w.uid for w in adapters)
        stack = self._cache.get(key)
        if stack is None:
            stack = LoraStack(adapters, self.num_layers, self.group_outs, self.kernels)
            self._cache[key] = stack
            while len(self._cache) > (CACHED_RESIDENT if self.kernels is not None else CACHED):
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return stack

    def prepare(self, resident: tuple) -> None:
        """Build, ahead of the first step naming them, the stack of the resident adapters (with the
        fused kernel: the stack every step uses while they stay resident)."""
        if self.kernels is not None:
            self._of_resident(resident)

    def _of_resident(self, resident: tuple) -> LoraStack | None:
        """The stack of the resident adapters, found or built only when the snapshot is a new one."""
        if resident is not self._resident:
            self._resident = resident
            self._resident_stack = self._stack(sorted(resident, key=lambda w: w.uid)) if resident else None
        return self._resident_stack

    def for_step(self, lora, num_rows: int, dtype: torch.dtype) -> StackedLora:
        """lora: the step's sagellm.model.lora_step.LoraBatch (adapters, their rows, the resident ones)."""
        stack = self._of_resident(lora.resident) if self.kernels is not None else None
        if stack is None or any(g.weights.uid not in stack.index for g in lora.groups):
            # The step's adapters (with the fused kernel: and every resident one, one stack for any
            # subset of them), where one was swapped out since the snapshot, or without the kernel.
            adapters = {g.weights.uid: g.weights for g in lora.groups}
            if self.kernels is not None:
                adapters.update((w.uid, w) for w in lora.resident)
            stack = self._stack(sorted(adapters.values(), key=lambda w: w.uid))
        index = stack.index
        device = stack.owners[0].device if stack.owners else None
        row_adapter = torch.full((num_rows,), -1, dtype=torch.long, device=device)
        for g in lora.groups:
            if g.rows is None:
                row_adapter.fill_(index[g.weights.uid])
            else:
                row_adapter[g.rows] = index[g.weights.uid]
        return StackedLora(stack, row_adapter, dtype)
