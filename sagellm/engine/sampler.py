"""Turns a step's logits into one token per sequence, applying each request's own parameters.

Order per row (TGI's): logit bias and penalties -> logprobs (reported before the warpers, so
top_logprobs are not cut by top_p) -> temperature, top_k, top_p, typical_p -> argmax or a
seeded multinomial draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sagellm.engine.sequence import Sequence


@dataclass
class Sample:
    token_id: int
    logprob: float | None  # None when the request did not ask for logprobs
    top: list[tuple[int, float]]  # (token_id, logprob), best first


def _apply_penalties(row: torch.Tensor, seq: Sequence, eos_ids: tuple[int, ...]) -> None:
    p = seq.params
    if p.repetition_penalty != 1.0:
        ids = torch.tensor(sorted(set(seq.all_ids)), dtype=torch.long)
        scores = row[ids]
        row[ids] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and seq.output_ids:
        counts = torch.bincount(torch.tensor(seq.output_ids), minlength=row.shape[0]).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    for token_id, bias in p.logit_bias:
        row[token_id] += bias
    if eos_ids and (p.ignore_eos or len(seq.output_ids) < p.min_new_tokens):
        row[list(eos_ids)] = float("-inf")


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


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> list[Sample]:
    """logits: [N, vocab] float32, one row per sequence in `seqs` (modified in place)."""
    for i, seq in enumerate(seqs):
        if seq.params.needs_penalties or seq.params.ignore_eos or seq.params.min_new_tokens:
            _apply_penalties(logits[i], seq, eos_ids)
    chosen = torch.argmax(logits, dim=-1)  # greedy rows keep this
    for i, seq in enumerate(seqs):
        if seq.params.do_sample:
            probs = _warp(logits[i], seq).softmax(-1)
            chosen[i] = torch.multinomial(probs, 1, generator=seq.generator)[0]
    chosen_ids = chosen.tolist()
    # Log-normalisers only for the rows that report logprobs: a pass over 49k+ logits per row
    # is a measurable share of a large batch's step (docs/performance.md).
    rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs or seq.params.top_n_tokens]
    lse = {}
    if rows:
        sub, picks = logits, chosen
        if len(rows) < len(seqs):
            idx = torch.tensor(rows)
            sub, picks = logits.index_select(0, idx), chosen.index_select(0, idx)
        lse = dict(zip(rows, torch.logsumexp(sub, dim=-1).tolist()))
        picked = dict(zip(rows, sub.gather(1, picks[:, None])[:, 0].tolist()))
    out = []
    for i, seq in enumerate(seqs):
        top: list[tuple[int, float]] = []
        if seq.params.top_n_tokens:
            values, ids = torch.topk(logits[i], seq.params.top_n_tokens)
            top = [(t, v - lse[i]) for t, v in zip(ids.tolist(), values.tolist())]
        out.append(Sample(chosen_ids[i], picked[i] - lse[i] if i in lse else None, top))
    return out
