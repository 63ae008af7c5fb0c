"""Turns a step's logits into one token per sequence, applying each request's own parameters.

Order per row (TGI's): logit bias and penalties -> logprobs (reported before the grammar mask
and the warpers, so top_logprobs show the model's own choices, not cut by top_p) -> the grammar
mask of constrained requests -> temperature, top_k, top_p, typical_p -> argmax or a seeded
multinomial draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sagellm.engine.constraint import allocate_bitmask, apply_bitmask
from sagellm.engine.sequence import Sequence


@dataclass
class Sample:
    token_id: int
    logprob: float | None  # None when the request did not ask for logprobs
    top: list[tuple[int, float]]  # (token_id, logprob), best first


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    p = seq.params
    if p.repetition_penalty != 1.0:
        ids = torch.tensor(sorted(set(seq.all_ids)), dtype=torch.long, device=row.device)
        scores = row[ids]
        row[ids] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and seq.output_ids:
        counts = torch.bincount(torch.tensor(seq.output_ids, device=row.device), minlength=row.shape[0]).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    for token_id, bias in p.logit_bias:
        row[token_id] += bias


def _eos_banned(seq: Sequence) -> bool:
    # A grammar decides when the output may end; min_tokens/ignore_eos cannot override it.
    p = seq.params
    return seq.matcher is None and (p.ignore_eos or len(seq.output_ids) < p.min_new_tokens)


def _warp(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if p.temperature != 1.0:
        row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the best always stays.
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        row = row.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if p.typical_p < 1.0:
        logp = row.log_softmax(-1)
        entropy = -(logp.exp() * logp).nan_to_num().sum()
        shifted = (-logp - entropy).abs()
        sorted_shift, order = torch.sort(shifted)
        probs = logp.exp()[order]
        drop = (probs.cumsum(-1) - probs) >= p.typical_p
        row = row.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return row


def _ban_eos(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> None:
    banned = [i for i, seq in enumerate(seqs) if _eos_banned(seq)] if eos_ids else []
    if banned:  # one indexing operation for the whole batch (min_tokens, ignore_eos)
        rows = torch.tensor(banned, device=logits.device)[:, None]
        logits[rows, torch.tensor(eos_ids, device=logits.device)[None, :]] = float("-inf")


def plain_greedy(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...], kernels
                 ) -> list[Sample] | None:
    """When every row is greedy with nothing else to apply (no penalties, logprobs or grammar),
    the picks straight off the model-dtype logits with the fused argmax (sagellm.model.cpu_kernels):
    converting a batch-64 step's bf16 logits to float32 and taking torch's argmax cost 3 ms of a
    40 ms step (docs/performance.md). The same tokens: bf16 to float32 is exact. None otherwise."""
    if kernels is None:
        return None
    for seq in seqs:
        p = seq.params
        if p.do_sample or p.needs_penalties or p.logprobs or p.top_n_tokens or seq.matcher is not None:
            return None
    _ban_eos(logits, seqs, eos_ids)
    return [Sample(t, None, []) for t in kernels.argmax_rows(logits).tolist()]


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> list[Sample]:
    """logits: [N, vocab] float32, one row per sequence in `seqs` (modified in place)."""
    for i, seq in enumerate(seqs):
        if seq.params.needs_penalties:
            _apply_penalties(logits[i], seq)
    _ban_eos(logits, seqs, eos_ids)
    # Log-normalisers only for the rows that report logprobs: a pass over 49k+ logits per row
    # is a measurable share of a large batch's step (docs/performance.md).
    rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs or seq.params.top_n_tokens]
    lse: dict[int, float] = {}
    top: dict[int, list[tuple[int, float]]] = {}
    every = len(rows) == len(seqs)
    idx = None if every or not rows else torch.tensor(rows, device=logits.device)
    if rows:
        sub = logits if every else logits.index_select(0, idx)
        lse = dict(zip(rows, torch.logsumexp(sub, dim=-1).tolist()))
        for i in rows:
            if seqs[i].params.top_n_tokens:
                values, ids = torch.topk(logits[i], seqs[i].params.top_n_tokens)
                top[i] = [(t, v - lse[i]) for t, v in zip(ids.tolist(), values.tolist())]
    constrained = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
    if constrained:
        bitmask = allocate_bitmask(len(constrained), logits.shape[1])
        for row, i in enumerate(constrained):
            seqs[i].matcher.fill(bitmask, row)
        apply_bitmask(logits, constrained, bitmask)
    chosen = torch.argmax(logits, dim=-1)  # greedy rows keep this
    for i, seq in enumerate(seqs):
        if seq.params.do_sample:
            probs = _warp(logits[i], seq).softmax(-1)
            # The seeded generator lives on the CPU (the same seed draws the same tokens anywhere).
            chosen[i] = torch.multinomial(probs.cpu(), 1, generator=seq.generator)[0]
    chosen_ids = chosen.tolist()
    picked = {}
    if rows:  # the chosen token's logit is untouched by the grammar mask (it was allowed)
        picks = chosen if every else chosen.index_select(0, idx)
        sub = logits if every else logits.index_select(0, idx)
        picked = dict(zip(rows, sub.gather(1, picks[:, None])[:, 0].tolist()))
    return [Sample(chosen_ids[i], picked[i] - lse[i] if i in lse else None, top.get(i, []))
            for i in range(len(seqs))]
