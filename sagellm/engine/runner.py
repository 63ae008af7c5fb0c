"""Builds one packed forward pass from a scheduled batch and returns the logits to sample from.

Rank 0 prepares the step's tensors; with tensor parallelism they are broadcast so every rank
runs the same forward on its shard of the weights (and its shard of the KV cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sagellm.model.attention import PrefillChunk, StepMetadata
from sagellm.model.forward import ModelForward
from sagellm.model.lora_step import LoraBatch, LoraGroup
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
    decode_blocks: torch.Tensor | None  # [B_decode, NB]
    decode_bias: torch.Tensor | None  # [B_decode, 1, 1, NB * block_size]
    prefills: list[PrefillChunk]
    decode_lens: torch.Tensor | None = None  # [B_decode] tokens of each context, this step's included
    fresh_blocks: torch.Tensor | None = None  # blocks used for the first time: zero them first
    # Rows of `keep` after the N sampled ones: prompt positions whose next-token logprob a
    # request asked for (TGI's decoder_input_details). 0 unless asked, so no cost otherwise.
    num_prompt_logprobs: int = 0
    lora: LoraBatch | None = None  # the rows of each LoRA adapter in the step; None: base model only


@dataclass
class PromptLogprobRows:
    """Which sequence the extra logits rows of one prefill chunk belong to: `count` rows for
    positions start .. start + count - 1, row p scoring the prompt token at p + 1."""

    seq: Sequence
    start: int
    count: int


class ModelRunner:
    def __init__(self, model: ModelForward, cache: PagedKVCache, device: torch.device | str = "cpu",
                 tp_group=None, adapters=None):
        """adapters: the engine's sagellm.engine.adapters.AdapterRegistry, or None (LoRA serving off)."""
        self.model = model
        self.adapters = adapters
        self.cache = cache
        self.device = torch.device(device)
        self.block_size = cache.block_size
        self.tp_group = tp_group  # sagellm.engine.distributed.TPGroup on rank 0, else None
        self.kernels = model.kernels  # the attention and the sampler use them too

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Flat cache slots of positions [start, end) of `seq`."""
        pos = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(self, batch: ScheduledBatch) -> tuple[StepInputs, list[PromptLogprobRows]]:
        tokens: list[int] = []
        positions: list[torch.Tensor] = []
        slot_parts: list[torch.Tensor] = []
        logit_rows: list[int] = []

        decode_blocks = decode_bias = None
        if batch.decodes:
            bs = self.block_size
            lengths = torch.tensor([seq.num_computed + 1 for seq in batch.decodes])
            num_blocks = -(-int(lengths.max()) // bs)
            table = [seq.block_table[:num_blocks] for seq in batch.decodes]
            decode_blocks = torch.tensor([t + [0] * (num_blocks - len(t)) for t in table], dtype=torch.long)
            past_end = torch.arange(num_blocks * bs)[None, :] >= lengths[:, None]
            decode_bias = torch.zeros(past_end.shape).masked_fill_(past_end, float("-inf"))[:, None, None, :]
            last = lengths - 1  # position of the token fed this step
            tokens.extend(seq.all_ids[int(n)] for seq, n in zip(batch.decodes, last))
            positions.append(last)
            slot_parts.append(decode_blocks.gather(1, (last // bs)[:, None])[:, 0] * bs + last % bs)
            logit_rows.extend(range(len(batch.decodes)))

        prefills: list[PrefillChunk] = []
        prompt_rows: list[PromptLogprobRows] = []
        extra_rows: list[int] = []
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
            # Prompt logprobs travel on the first token's event, so none are kept once it is out
            # (a recompute after preemption). The last prompt position predicts the first
            # generated token: a sampled row, not one of these.
            if seq.params.prompt_logprobs and not seq.output_ids:
                count = min(start + n, len(seq.prompt_ids) - 1) - start
                if count > 0:
                    prompt_rows.append(PromptLogprobRows(seq, start, count))
                    extra_rows.extend(range(q_start, q_start + count))

        lora = _lora_batch(batch, len(tokens), self.adapters)
        # Sampled rows first, so logits[:num_sampled] is what the sampler reads.
        keep = logit_rows + extra_rows or [len(tokens) - 1]  # the model wants at least one row
        fresh = self.cache.allocator.take_fresh()
        return StepInputs(
            input_ids=torch.tensor([tokens], dtype=torch.long),
            position_ids=torch.cat(positions).unsqueeze(0),
            keep=torch.tensor(keep), num_sampled=len(logit_rows),
            slot_mapping=torch.cat(slot_parts), num_decode=len(batch.decodes),
            decode_blocks=decode_blocks, decode_bias=decode_bias, prefills=prefills,
            decode_lens=lengths if batch.decodes else None,
            fresh_blocks=torch.tensor(fresh, dtype=torch.long) if fresh else None,
            num_prompt_logprobs=len(extra_rows), lora=lora), prompt_rows

    @torch.inference_mode()
    def forward(self, step: StepInputs) -> torch.Tensor:
        """Logits [step.num_sampled + step.num_prompt_logprobs, vocab] in the model's dtype. Runs on
        every rank."""
        dev = self.device
        to = (lambda t: None if t is None else t.to(dev, non_blocking=True))
        if step.fresh_blocks is not None:
            self.cache.zero_blocks(to(step.fresh_blocks))
        prefills = [PrefillChunk(c.q_start, c.q_len, c.ctx_len, to(c.slots), to(c.mask)) for c in step.prefills]
        meta = StepMetadata(cache=self.cache, slot_mapping=to(step.slot_mapping), num_decode=step.num_decode,
                            decode_blocks=to(step.decode_blocks), decode_bias=to(step.decode_bias),
                            prefills=prefills, decode_lens=to(step.decode_lens), kernels=self.kernels,
                            batch_invariant=self.model.batch_invariant)
        lora = None if step.lora is None else LoraBatch([LoraGroup(g.weights, to(g.rows)) for g in step.lora.groups],
                                                           step.lora.resident)
        logits = self.model(to(step.input_ids), to(step.position_ids), to(step.keep), meta, lora)
        return logits[:step.num_sampled + step.num_prompt_logprobs]

    def run(self, batch: ScheduledBatch, phases: dict[str, float] | None = None
            ) -> tuple[torch.Tensor, list[PromptLogprobRows]]:
        """Logits as forward() returns them, and which sequences the rows past the sampled ones
        belong to (in row order)."""
        t0 = time.perf_counter()
        step, prompt_rows = self.prepare(batch)
        if self.tp_group is not None:
            self.tp_group.broadcast_step(step)
        t1 = time.perf_counter()
        logits = self.forward(step)
        if phases is not None:
            phases["prepare"] += t1 - t0
            phases["forward"] += time.perf_counter() - t1
        # These tokens' K/V are now stored.
        for seq in batch.decodes:
            seq.num_computed += 1
        for seq, n in batch.prefills:
            seq.num_computed += n
        return logits, prompt_rows


def _lora_batch(batch: ScheduledBatch, num_tokens: int, adapters) -> LoraBatch | None:
    """Which rows of the packed step (decode tokens, then each prefill chunk's) run with which
    adapter, and which adapters are resident; None when no sequence has one."""
    if all(seq.lora is None for seq in batch.decodes) and all(seq.lora is None for seq, _ in batch.prefills):
        return None
    rows: dict[int, tuple[object, list[int]]] = {}
    for i, seq in enumerate(batch.decodes):
        if seq.lora is not None:
            rows.setdefault(seq.lora.uid, (seq.lora, []))[1].append(i)
    start = len(batch.decodes)
    for seq, n in batch.prefills:
        if seq.lora is not None:
            rows.setdefault(seq.lora.uid, (seq.lora, []))[1].extend(range(start, start + n))
        start += n
    return LoraBatch([LoraGroup(w, None if len(r) == num_tokens else torch.tensor(r, dtype=torch.long))
                      for w, r in rows.values()], adapters.resident_weights() if adapters is not None else ())
