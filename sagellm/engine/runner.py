"""Builds one packed forward pass from a scheduled batch and returns the logits to sample from."""

from __future__ import annotations

import torch

from sagellm.engine.attention import PrefillChunk, StepMetadata
from sagellm.engine.kv_cache import PagedKVCache
from sagellm.engine.scheduler import ScheduledBatch
from sagellm.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, device: torch.device | str = "cpu"):
        self.model = model
        self.cache = cache
        self.device = torch.device(device)
        self.block_size = cache.block_size

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Flat cache slots of positions [start, end) of `seq`."""
        pos = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Returns float32 logits [len(batch.sampling), vocab]."""
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
                prefills.append(PrefillChunk(q_start, n, start, slots.to(self.device), mask.to(self.device)))
            if start + n == seq.num_tokens:
                logit_rows.append(q_start + n - 1)

        dev = self.device
        meta = StepMetadata(
            cache=self.cache,
            slot_mapping=torch.cat(slot_parts).to(dev),
            num_decode=len(batch.decodes),
            decode_slots=None if decode_slots is None else decode_slots.to(dev),
            decode_mask=None if decode_mask is None else decode_mask.to(dev),
            prefills=prefills,
        )
        input_ids = torch.tensor([tokens], dtype=torch.long, device=dev)
        position_ids = torch.cat(positions).unsqueeze(0).to(dev)
        if not logit_rows:
            keep = torch.tensor([len(tokens) - 1], device=dev)
        else:
            keep = torch.tensor(logit_rows, device=dev)
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                         logits_to_keep=keep, sagellm_meta=meta)
        # Advance the cache bookkeeping: these tokens' K/V are now stored.
        for seq in batch.decodes:
            seq.num_computed += 1
        for seq, n in batch.prefills:
            seq.num_computed += n
        logits = out.logits[0].float()  # [len(keep), vocab]
        return logits if logit_rows else logits[:0]
