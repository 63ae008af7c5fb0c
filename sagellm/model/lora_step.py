"""Applying LoRA adapters inside one packed step: rows (tokens) of different adapters and of the
base model share the forward pass, and each projection an adapter targets gains x @ A @ B on that
adapter's rows only.

Here, for transformers' modules (families the lean decoder does not take): LoraLinear around each
decoder-layer projection adds each adapter's x[rows] @ A @ B to its rows, one adapter at a time.
The lean decoder (sagellm.model.fast_decoder) takes the same LoraBatch but applies it stacked
(sagellm.model.lora_stack: two operators per fused projection for every adapter at once), as
this per-adapter loop was measured at 0.18x the base model's throughput with 4 adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sagellm.model.lora import LoraWeights, decoder_layers


@dataclass
class LoraGroup:
    weights: LoraWeights
    rows: torch.Tensor | None  # [n] int64 rows of the packed step; None: every row


class LoraBatch:
    """This step's adapters and their rows; empty for a base-only step (then add() does nothing)."""

    def __init__(self, groups: list[LoraGroup], resident: tuple[LoraWeights, ...] = ()):
        """resident: the adapters resident when the step was prepared (the step's among them, barring a
        race); the lean decoder stacks them all, so one stack serves every step while they stay."""
        self.groups = groups
        self.resident = resident

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, proj: str) -> None:
        """y [T, out] (a view is fine) += each group's x[rows] @ A @ B on its rows; x [T, in]."""
        for g in self.groups:
            ab = g.weights.modules.get((layer, proj))
            if ab is None:  # this adapter leaves the projection alone
                continue
            a, b = ab
            if g.rows is None:
                y.add_(torch.mm(torch.mm(x, a), b))
            else:
                y.index_add_(0, g.rows, torch.mm(torch.mm(x.index_select(0, g.rows), a), b))


class LoraSlot:
    """Where the step's LoraBatch waits for the wrapped projections of transformers' modules."""

    def __init__(self):
        self.batch: LoraBatch | None = None


class LoraLinear(nn.Module):
    """A decoder-layer projection (nn.Linear or cpu_linear.PackedLinear) plus the step's adapters."""

    def __init__(self, base: nn.Module, slot: LoraSlot, layer: int, proj: str):
        super().__init__()
        self.base, self.slot, self.layer, self.proj = base, slot, layer, proj
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [1, T, out]
        batch = self.slot.batch
        if batch is not None and batch.groups:
            batch.add(y.view(-1, self.out_features), x.reshape(-1, self.in_features), self.layer, self.proj)
        return y


def wrap_linears(model: nn.Module, slot: LoraSlot) -> int:
    """Wrap every linear projection in the decoder layers; returns how many."""
    swaps = []
    for i, layer in enumerate(decoder_layers(model) or []):
        for path, module in layer.named_modules():
            if path and hasattr(module, "in_features") and hasattr(module, "out_features") and not isinstance(
                    module, LoraLinear) and not list(module.children()):
                swaps.append((layer, i, path, module))
    for layer, i, path, module in swaps:
        parent_path, _, attr = path.rpartition(".")
        parent = layer.get_submodule(parent_path) if parent_path else layer
        setattr(parent, attr, LoraLinear(module, slot, i, path))
    return len(swaps)
