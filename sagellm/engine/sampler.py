"""Turns a step's logits into one token per sequence, applying each request's own parameters.

Order per row (TGI's): logit bias and penalties, the EOS ban (min_tokens, ignore_eos) ->
logprobs (reported before the grammar mask and the warpers, so top_logprobs show the model's own
choices, not cut by top_p) -> the grammar mask of constrained requests -> argmax (greedy), or
temperature, top_k, top_p, min_p, typical_p (transformers' order) and a draw.

The draw is an exponential race: the token is argmax_i p_i / E_i over the tokens the filters keep,
with E_i ~ Exp(1) independent, which picks token i with probability exactly p_i / sum(p), as a
multinomial draw does, without a cumulative sum or a generator per row. E_i comes from a
counter-based hash of (the request's seed, the token's index in the output, the token id)
(sampler_torch.py), so a seeded request draws the same tokens alone or in any batch, and again
after a preemption.

The whole batch goes through one call: the fused CPU kernel (sagellm/model/csrc/sampler.cpp)
where the kernels are loaded, else the same steps in torch operators (sampler_torch.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sagellm.engine import sampler_torch
from sagellm.engine.sampling_batch import SamplingBatch, eos_banned
from sagellm.engine.sequence import Sequence


@dataclass
class Sample:
    token_id: int
    logprob: float | None  # None when the request did not ask for logprobs
    top: list[tuple[int, float]]  # (token_id, logprob), best first
    # Set when no token could be drawn for this row (nothing allowed, NaN logits, NaN
    # parameters): its request fails, the rest of the batch carries on.
    error: str | None = None


def _ban_eos(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> None:
    banned = [i for i, seq in enumerate(seqs) if eos_banned(seq)] if eos_ids else []
    if banned:  # one indexing operation for the whole batch
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


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...], kernels=None) -> list[Sample]:
    """logits: [N, vocab] in the model's dtype, one row per sequence in `seqs`; left unchanged
    (the engine samples rows again from them when a batch raises)."""
    if not seqs:  # a step of prompt chunks only
        return []
    batch = SamplingBatch(seqs, eos_ids, logits.shape[1])
    if kernels is not None and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16):
        tokens, logprobs, top_ids, top_lp = kernels.sample_rows(logits.contiguous(), *batch.kernel_args())
    else:
        # A float32 copy even of float32 logits: the torch path writes penalties into its rows.
        tokens, logprobs, top_ids, top_lp = sampler_torch.sample_rows(logits.to(torch.float32, copy=True), batch)
    tokens = tokens.tolist()
    logprobs = logprobs.tolist() if any(seq.params.logprobs for seq in seqs) else None
    tops = (top_ids.tolist(), top_lp.tolist()) if batch.top_n else None
    out = []
    for i, seq in enumerate(seqs):
        p = seq.params
        if tokens[i] < 0:
            out.append(Sample(0, None, [], error="no token could be sampled: every token's logit was "
                                                "-inf or NaN after the request's parameters"))
            continue
        lp = logprobs[i] if p.logprobs and logprobs is not None else None
        top = []
        if p.top_n_tokens and tops is not None:
            top = [(t, v) for t, v in zip(tops[0][i][:p.top_n_tokens], tops[1][i][:p.top_n_tokens]) if t >= 0]
        out.append(Sample(tokens[i], None if lp is None or math.isnan(lp) else lp, top))
    return out
