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

A stack depends only on which adapters are in the step; LoraStacks keeps the last few built.
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


class LoraStack:
    """Adapters (a list of sagellm.model.lora.LoraWeights) stacked for every (layer, group)."""

    def __init__(self, adapters: list, num_layers: int, group_outs: tuple[tuple[int, ...], ...]):
        """group_outs[g]: the output width of each part of GROUPS[g] (q, k, v sizes...)."""
        self.uids = tuple(w.uid for w in adapters)
        layouts: dict[tuple[int, ...], int] = {}  # column owners (adapter index per column) -> id
        self.entries: dict[tuple[int, int], tuple[_Matrix, _Matrix, int]] = {}
        for layer in range(num_layers):
            for g, parts in enumerate(GROUPS):
                outs = group_outs[g]
                starts = [sum(outs[:j]) for j in range(len(outs))]
                a_cols, b_cols, owner = [], [], []
                for i, w in enumerate(adapters):
                    for j, part in enumerate(parts):
                        ab = w.modules.get((layer, part))
                        if ab is None:
                            continue
                        a, b = ab  # [in, r], [r, out_j] (scaled)
                        a_cols.append(a)
                        b_cols.append((starts[j], b))
                        owner += [i] * a.shape[1]
                if not a_cols:
                    continue
                a = torch.cat(a_cols, dim=1).t()  # [R, in]
                big_b = a.new_zeros(sum(outs), a.shape[0])  # [out, R], block-diagonal
                col = 0
                for start, b in b_cols:
                    big_b[start:start + b.shape[1], col:col + b.shape[0]] = b.t()
                    col += b.shape[0]
                layout = layouts.setdefault(tuple(owner), len(layouts))
                self.entries[(layer, g)] = (_Matrix(a), _Matrix(big_b), layout)
        device = adapters[0].modules[next(iter(adapters[0].modules))][0].device
        self.owners = [torch.tensor(o, dtype=torch.long, device=device) for o in layouts]


class StackedLora:
    """One step's adapters over its rows: apply() adds their share to a fused projection."""

    def __init__(self, stack: LoraStack, row_adapter: torch.Tensor, dtype: torch.dtype):
        """row_adapter [T]: each row's index in the stack's adapters, -1 for the base model."""
        self.stack = stack
        # One mask per distinct column layout (usually one per group), [T, R] in the model dtype.
        self.masks = [(row_adapter[:, None] == owner[None, :]).to(dtype) for owner in stack.owners]

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: int) -> torch.Tensor:
        """y [T, out] (the fused projection's base output, contiguous), x [T, in] its input ->
        y plus the adapters' share on their rows (a new tensor; y itself when none applies)."""
        entry = self.stack.entries.get((layer, group))
        if entry is None:
            return y
        a, b, layout = entry
        return b.plus(a.times_mask(x, self.masks[layout]), y)


class LoraStacks:
    """The last CACHED stacks built, by the set of adapters (their load uids)."""

    def __init__(self, num_layers: int, group_outs: tuple[tuple[int, ...], ...]):
        self.num_layers, self.group_outs = num_layers, group_outs
        self._cache: OrderedDict[tuple[int, ...], LoraStack] = OrderedDict()

    def for_step(self, lora, num_rows: int, dtype: torch.dtype) -> StackedLora:
        """lora: the step's sagellm.model.lora_step.LoraBatch (adapters and their rows)."""
        groups = sorted(lora.groups, key=lambda g: g.weights.uid)  # one key whatever the row order
        key = tuple(g.weights.uid for g in groups)
        stack = self._cache.get(key)
        if stack is None:
            stack = LoraStack([g.weights for g in groups], self.num_layers, self.group_outs)
            self._cache[key] = stack
            while len(self._cache) > CACHED:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        device = stack.owners[0].device if stack.owners else None
        row_adapter = torch.full((num_rows,), -1, dtype=torch.long, device=device)
        for i, g in enumerate(groups):
            if g.rows is None:
                row_adapter.fill_(i)
            else:
                row_adapter[g.rows] = i
        return StackedLora(stack, row_adapter, dtype)
