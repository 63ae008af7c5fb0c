"""oneDNN-packed linear layers for bfloat16 on CPU.

Measured on this project's 2-core machines (docs/performance.md): the same bf16 matmuls run about
2x faster at batch 1 (3.4x for the 49152-wide lm_head) and 1.5x at batch 64 once the weights are
reordered into oneDNN's blocked layout, with bit-identical results. transformers' modules stay as
they are; only each nn.Linear's weight layout and kernel change.

A single row (a decode step at batch 1) goes to sagellm's own `gemv_bf16` kernel where the CPU
kernels are loaded and the CPU has AVX512-BF16 (csrc/gemv.cpp): oneDNN spends ~13 us a call
before any arithmetic, 121 calls a step on SmolLM2. That keeps the row-major weight beside the
packed one (the linear weights twice in memory), for models whose copy stays under
GEMV_COPY_LIMIT.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def pad_rows(x: torch.Tensor, tile: int) -> torch.Tensor:
    """x [M, K] with zero rows appended up to a multiple of `tile` (BATCH_INVARIANT). Measured on
    this machine (bf16, oneDNN): a row's result changes with M for K = 1536 (M = 1 vs 7+) and
    K >= 2048 (M = 1 vs 2+), never once M is a multiple of 8 (M up to 300, every layer shape of
    SmolLM2 and 2048 x 8192)."""
    extra = -x.shape[0] % tile
    return x if not extra else torch.cat([x, x.new_zeros(extra, x.shape[1])])


# The one-row kernel keeps a second, row-major copy of every linear weight: worth it for small
# models (where oneDNN's per-call cost dominates a decode step), not for one whose copy would add
# gigabytes. Above this many bytes of bf16 linear weights, one rows stay on oneDNN.
GEMV_COPY_LIMIT = 2 << 30


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the bf16 nn.Linear weights a row-major copy would duplicate."""
    return sum(m.weight.nbytes for m in model.modules()
               if isinstance(m, nn.Linear) and m.weight.dtype == torch.bfloat16)


def gemv_kernel(kernels, model: nn.Module):
    """The one-row bf16 kernel (torch.ops.sagellm.gemv_bf16) for `model`'s linears, or None where
    it cannot run or its weight copy would pass GEMV_COPY_LIMIT (said once in the log)."""
    from sagellm.model import cpu_kernels

    if kernels is None or not cpu_kernels.has_bf16_dot():
        return None
    size = linear_weight_bytes(model)
    if size > GEMV_COPY_LIMIT:
        log.info("one-row bf16 kernel off: its row-major weight copy would add %.1f GB (limit %.1f GB); "
                 "single-row steps use oneDNN", size / 1e9, GEMV_COPY_LIMIT / 1e9)
        return None
    return kernels.gemv_bf16


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, row_tile: int = 1, gemv=None):
        super().__init__()
        self.row_tile = row_tile  # > 1: rows padded to a multiple of it (batch invariance)
        self.out_features, self.in_features = weight.shape
        # The batch-size hint only tunes the layout; measured speed is the same for 1..300 rows.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        self.bias = None if bias is None else bias.detach()
        # One row's kernel and its row-major weight [out, in]; never with row_tile > 1: a row's
        # result must not change with the number of rows (BATCH_INVARIANT).
        self.gemv = gemv if row_tile == 1 else None
        self.weight = weight.detach().contiguous() if self.gemv is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None and x.numel() == self.in_features:  # x [..., 1, in]: one row
            y = self.gemv(x.contiguous(), self.weight)
            return y if self.bias is None else y + self.bias
        if self.row_tile > 1 and x.dim() == 2:
            m = x.shape[0]
            return torch.ops.mkldnn._linear_pointwise(pad_rows(x, self.row_tile), self.packed, self.bias,
                                                      "none", [], "")[:m]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def available(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight")


def pack_linears(model: nn.Module, row_tile: int = 1, gemv=None) -> int:
    """Swap every bf16 nn.Linear for a PackedLinear (one-row calls on `gemv`, see gemv_kernel);
    returns how many were swapped."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child.weight, child.bias, row_tile, gemv))
    return len(swaps)
