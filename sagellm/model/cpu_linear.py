"""oneDNN-packed linear layers for bfloat16 on CPU.

Measured on this project's 2-core machines (docs/performance.md): the same bf16 matmuls run about
2x faster at batch 1 (3.4x for the 49152-wide lm_head) and 1.5x at batch 64 once the weights are
reordered into oneDNN's blocked layout, with bit-identical results. transformers' modules stay as
they are; only each nn.Linear's weight layout and kernel change.

Up to ROWS_LIMIT rows (a decode step at batch 1..64) go to sagellm's own `gemm_rows_bf16` kernel
where the CPU kernels are loaded and the CPU has AVX512-BF16 (csrc/gemm_rows.cpp): oneDNN spends
~13 us a call before any arithmetic, 121 calls a step on SmolLM2, and its M = 2..64 tiles reach
less of the CPU (bench/linear_rows.py). That keeps a second copy of each weight in the kernel's
layout beside the packed one (the linear weights twice in memory), for models whose copy stays
under GEMV_COPY_LIMIT. A row's result there is the same whatever else is in the call, at any M.
Under BATCH_INVARIANT (row_tile > 1) every call, prefill chunks too, goes to that kernel, which then
holds the only copy of the weights: a row's result is the same alone, in any decode batch, and in
any prefill chunk. Without the kernel that mode pads rows to 8 for oneDNN (pad_rows).
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


# The rows kernel keeps a second copy of every linear weight: worth it for small models (where
# oneDNN's per-call cost dominates a decode step), not for one whose copy would add gigabytes.
# Above this many bytes of bf16 linear weights, every step stays on oneDNN.
GEMV_COPY_LIMIT = 2 << 30
# The most rows a call sends to gemm_rows_bf16. Measured (bench/linear_rows.py, SmolLM2-135M's
# five shapes, weights beyond L3, oneDNN packed alternating in one run): 1.2-1.8x oneDNN at M = 2
# and 4, 1.15-1.39x at 16, 1.02-1.14x at 64; prefill chunks of more rows stay on oneDNN.
ROWS_LIMIT = 64


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the bf16 nn.Linear weights a row-major copy would duplicate."""
    return sum(m.weight.nbytes for m in model.modules()
               if isinstance(m, nn.Linear) and m.weight.dtype == torch.bfloat16)


def pack_rows_weight(w: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> [ceil(N/64), ceil(K/2), 64, 2], zero padded: gemm_rows_bf16's layout (for each
    64-column block and each pair of k, the block's 64 columns' two values side by side)."""
    n, k = w.shape
    nb, kp = -(-n // 64), -(-k // 2)
    p = w.new_zeros(nb * 64, kp * 2)
    p[:n, :k] = w
    return p.view(nb, 64, kp, 2).permute(0, 2, 1, 3).contiguous()


def rows_kernel(kernels, model: nn.Module, sole: bool = False):
    """The few-rows bf16 kernel (torch.ops.sagellm.gemm_rows_bf16) for `model`'s linears, or None
    where it cannot run or its weight copy would pass GEMV_COPY_LIMIT (said once in the log).
    sole: the kernel takes every call and keeps the only copy (BATCH_INVARIANT): no size limit."""
    from sagellm.model import cpu_kernels

    if kernels is None or not cpu_kernels.has_bf16_dot():
        return None
    size = linear_weight_bytes(model)
    if size > GEMV_COPY_LIMIT and not sole:
        log.info("few-rows bf16 kernel off: its weight copy would add %.1f GB (limit %.1f GB); "
                 "decode steps use oneDNN", size / 1e9, GEMV_COPY_LIMIT / 1e9)
        return None
    return kernels.gemm_rows_bf16


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, row_tile: int = 1, rows=None):
        super().__init__()
        # > 1 (BATCH_INVARIANT): every call on `rows` whatever its M, or without it rows padded to
        # a multiple of row_tile for oneDNN, whose row result depends on M otherwise (pad_rows).
        self.row_tile = row_tile
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach()
        # The few-rows kernel and its packing of the weight (pack_rows_weight).
        self.rows = rows
        self.rows_weight = pack_rows_weight(weight.detach()) if rows is not None else None
        # The batch-size hint only tunes the layout; measured speed is the same for 1..300 rows.
        self.packed = (None if rows is not None and self.rows_limit is None
                       else torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))

    @property
    def rows_limit(self) -> int | None:
        """The most rows a call sends to `rows`; None (BATCH_INVARIANT): every call."""
        return ROWS_LIMIT if self.row_tile == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None and (self.rows_limit is None or x.numel() <= self.rows_limit * self.in_features):
            y = self.rows(x.contiguous(), self.rows_weight, self.out_features)  # x [..., M, in]
            return y if self.bias is None else y + self.bias
        if self.row_tile > 1 and x.dim() == 2:
            m = x.shape[0]
            return torch.ops.mkldnn._linear_pointwise(pad_rows(x, self.row_tile), self.packed, self.bias,
                                                      "none", [], "")[:m]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def available(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight")


def pack_linears(model: nn.Module, row_tile: int = 1, rows=None) -> int:
    """Swap every bf16 nn.Linear for a PackedLinear (calls of up to ROWS_LIMIT rows on `rows`, see
    rows_kernel); returns how many were swapped."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child.weight, child.bias, row_tile, rows))
    return len(swaps)
