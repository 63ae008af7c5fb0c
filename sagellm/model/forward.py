"""ModelForward: the loaded model and what runs its forward pass over a packed step, as explicit
objects: the fused CPU kernels (sagellm.model.cpu_kernels) and the lean decoder
(sagellm.model.fast_decoder) where they apply, else transformers' modules with our paged attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sagellm.model.attention import paged_attention


@dataclass
class ModelForward:
    module: torch.nn.Module  # transformers' causal LM, attention routed to sagellm.model.attention
    kernels: object | None = None  # torch.ops.sagellm with the fused kernels, or None: torch operators
    fast: object | None = None  # a FastDecoder (one rank, Llama family), or None: transformers' forward
    # With LoRA serving on and transformers' forward: where the wrapped projections find the step's
    # adapters (sagellm.model.lora_step). The lean decoder takes them as an argument instead.
    lora_slot: object | None = None
    # BATCH_INVARIANT: each row's arithmetic independent of the rest of the step (matmul row tiles,
    # one rotary table, one prefill attention path); the scheduler aligns prompt chunks to match.
    batch_invariant: bool = False

    def prepare_lora(self, resident) -> None:
        """Stack the resident LoRA adapters (sagellm.model.lora.LoraWeights) ahead of the first step."""
        if self.fast is not None:
            self.fast.lora_stacks.prepare(resident)

    @property
    def config(self):
        return self.module.config

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor,
                 meta, lora=None) -> torch.Tensor:
        """input_ids, position_ids: [1, T]; keep: [N] rows to score; meta: the step's
        sagellm.model.attention.StepMetadata; lora: the step's sagellm.model.lora_step.LoraBatch,
        or None (base model only) -> logits [N, vocab] in the model's dtype."""
        if self.fast is not None:  # same arithmetic, less Python
            return self.fast(input_ids, position_ids, keep, paged_attention, meta, lora)
        if lora is not None and self.lora_slot is None:  # never serve an adapter's rows without it
            raise RuntimeError("LoRA rows in a step, but LoRA serving is off")
        if self.lora_slot is not None:
            self.lora_slot.batch = lora
        try:
            return self.module(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                               logits_to_keep=keep, sagellm_meta=meta).logits[0]
        finally:
            if self.lora_slot is not None:
                self.lora_slot.batch = None
