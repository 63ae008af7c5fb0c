"""Builds one packed forward pass from a scheduled batch and returns the logits to sample from.

Rank 0 prepares the step's tensors; with tensor parallelism they are broadcast so every rank
runs the same forward on its shard of the weights (and its shard of the KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sagellm.engine.attention import PrefillChunk, StepMetadata
from sagellm.engine.kv_cache import PagedKVCache
from sagellm.engine.scheduler import ScheduledBatch
from sagellm.engine.sequence import Sequence


@dataclass
class StepInputs:
    """Everything a rank needs for one forward pass; plain CPU tensors, cheap to broadcast."""

    input_ids: torch.Tensor  # [1, T] packed: decode tokens first, then prefill chunks
    position_ids: torch.Tensor  # [1, T]
    keep: torch.Tensor  # [N] rows of T whose logits are sampled
    num_sampled: int  # N, or 0 when no sequence samples this step
    slot_mapping: torch.Tensor  # [T]
    num_decode: int
    decode_slots: torch.Tensor | None  # [B_decode, L_max]
    decode_mask: torch.Tensor | None  # [B_decode, 1, 1, L_max]
    prefills: list[PrefillChunk]


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, device: torch.device | str = "cpu", tp_group=None):
        self.model = model
        self.cache = cache
        self.device = torch.device(device)
        self.block_size = cache.block_size
        self.tp_group = tp_group  # sagellm.engine.distributed.TPGroup on rank 0, else None

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Flat cache slots of positions [start, end) of `seq`."""
        pos = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        tokens: list[int] = []
        positions: list[torch.Tensor] = []
        slot_parts: list[torch.Tensor] = []
        logit_rows: list[int] = []

        decode_slots = decode_mask = None
        if batch.decodes:
            lengths = [seq.num_computed + 1 for seq in batch.decodes]
            max_len = max(lengths)
            decode_slots = torch.zeros(len(batch.decodes), max_len, dtype=torch.long)
            decode_mask = torch.zeros(len(batch.decodes), 1, 1, max_len, dtype=torch.bool)
            for i, seq in enumerate(batch.decodes):
                n = lengths[i]
                slots = self._slots(seq, 0, n)
                decode_slots[i, :n] = slots
                decode_mask[i, 0, 0, :n] = True
                tokens.append(seq.all_ids[n - 1])
                positions.append(torch.tensor([n - 1]))
                slot_parts.append(slots[-1:])
                logit_rows.append(i)

        prefills: list[PrefillChunk] = []
        for seq, n in batch.prefills:
            start = seq.num_computed
            q_start = len(tokens)
            tokens.extend(seq.all_ids[start:start + n])
            positions.append(torch.arange(start, start + n))
            if start == 0:
                slot_parts.append(self._slots(seq, 0, n))
                prefills.append(PrefillChunk(q_start, n, 0, None, None))
            else:
                slots = self._slots(seq, 0, start + n)
                slot_parts.append(slots[start:])
                # Query i (absolute position start + i) sees keys 0 .. start + i.
                mask = torch.arange(start + n)[None, :] <= (start + torch.arange(n))[:, None]
                prefills.append(PrefillChunk(q_start, n, start, slots, mask))
            if start + n == seq.num_tokens:
                logit_rows.append(q_start + n - 1)

        keep = logit_rows or [len(tokens) - 1]  # the model wants at least one row
        return StepInputs(
            input_ids=torch.tensor([tokens], dtype=torch.long),
            position_ids=torch.cat(positions).unsqueeze(0),
            keep=torch.tensor(keep), num_sampled=len(logit_rows),
            slot_mapping=torch.cat(slot_parts), num_decode=len(batch.decodes),
            decode_slots=decode_slots, decode_mask=decode_mask, prefills=prefills)

    @torch.inference_mode()
    def forward(self, step: StepInputs) -> torch.Tensor:
        """float32 logits [step.num_sampled, vocab]. Runs on every rank."""
        dev = self.device
        to = (lambda t: None if t is None else t.to(dev, non_blocking=True))
        prefills = [PrefillChunk(c.q_start, c.q_len, c.ctx_len, to(c.slots), to(c.mask)) for c in step.prefills]
        meta = StepMetadata(cache=self.cache, slot_mapping=to(step.slot_mapping), num_decode=step.num_decode,
                            decode_slots=to(step.decode_slots), decode_mask=to(step.decode_mask),
                            prefills=prefills)
        out = self.model(input_ids=to(step.input_ids), position_ids=to(step.position_ids), use_cache=False,
                         logits_to_keep=to(step.keep), sagellm_meta=meta)
        return out.logits[0, :step.num_sampled].float()

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        step = self.prepare(batch)
        if self.tp_group is not None:
            self.tp_group.broadcast_step(step)
        logits = self.forward(step)
        # These tokens' K/V are now stored.
        for seq in batch.decodes:
            seq.num_computed += 1
        for seq, n in batch.prefills:
            seq.num_computed += n
        return logits
