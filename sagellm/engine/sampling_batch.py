"""One step's sampling inputs as tensors, a row per sequence: what the sampler's kernel
(sagellm/model/csrc/sampler.cpp) and its torch twin (sampler_torch.py) read. Built with one pass
over the rows in Python; no tensor operation per row."""

from __future__ import annotations

from itertools import chain

import torch

from sagellm.engine.constraint import allocate_bitmask
from sagellm.engine.sequence import Sequence

# Columns of `fparams` (float32) and `iparams` (int64); the kernel's FParam / IParam.
TEMPERATURE, TOP_P, MIN_P, TYPICAL_P, REPETITION, FREQUENCY, PRESENCE = range(7)
TOP_K, SEED, INDEX, FLAGS, GRAMMAR_ROW = range(5)
# FLAGS bits
BAN_EOS, LOGPROB, TOP_N = 1, 2, 4


def eos_banned(seq: Sequence) -> bool:
    """min_tokens not reached yet, or ignore_eos. A grammar decides when its output may end:
    those cannot override it."""
    p = seq.params
    return seq.matcher is None and (p.ignore_eos or len(seq.output_ids) < p.min_new_tokens)


def _int32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32) if values else torch.empty(0, dtype=torch.int32)


def _offsets(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    if any(lengths):
        torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0, out=out[1:])
    return out


class SamplingBatch:
    def __init__(self, seqs: list[Sequence], eos_ids: tuple[int, ...], vocab: int):
        self.seqs, self.vocab = seqs, vocab
        floats, ints, seen, outputs, bias = [], [], [], [], []
        constrained: list[Sequence] = []
        self.top_n = 0
        for seq in seqs:
            p = seq.params
            ban = bool(eos_ids) and eos_banned(seq)
            flags = BAN_EOS * ban | LOGPROB * bool(p.logprobs) | TOP_N * (p.top_n_tokens > 0)
            self.top_n = max(self.top_n, p.top_n_tokens)
            grammar_row = -1
            if seq.matcher is not None:
                grammar_row = len(constrained)
                constrained.append(seq)
            seed = p.seed or 0
            ints.append((p.top_k if p.do_sample else 0, seed - 2**64 if seed >= 2**63 else seed,
                         len(seq.output_ids), flags, grammar_row))
            floats.append((p.temperature if p.do_sample else 0.0, p.top_p, p.min_p, p.typical_p,
                           p.repetition_penalty, p.frequency_penalty, p.presence_penalty))
            seen.append(seq.unique_prompt_ids if p.repetition_penalty != 1.0 else None)
            outputs.append(seq.output_ids if p.needs_penalties else ())
            bias.append(p.logit_bias)
        self.fparams = torch.tensor(floats, dtype=torch.float32)  # [N, 7]
        self.iparams = torch.tensor(ints, dtype=torch.int64)  # [N, 5]
        present = [t for t in seen if t is not None]
        self.seen_ids = torch.cat(present) if present else torch.empty(0, dtype=torch.int32)
        self.seen_offsets = _offsets([0 if t is None else t.numel() for t in seen])
        self.output_ids = _int32(list(chain.from_iterable(outputs)))
        self.output_offsets = _offsets([len(o) for o in outputs])
        self.bias_ids = _int32([t for b in bias for t, _ in b])
        self.bias_values = torch.tensor([v for b in bias for _, v in b], dtype=torch.float32)
        self.bias_offsets = _offsets([len(b) for b in bias])
        self.eos_ids = torch.tensor(eos_ids, dtype=torch.int64)
        # The grammar's allowed tokens, one bitmask row per constrained sequence.
        self.bitmask = allocate_bitmask(len(constrained), vocab)
        for row, seq in enumerate(constrained):
            seq.matcher.fill(self.bitmask, row)

    def kernel_args(self) -> tuple:
        return (self.fparams, self.iparams, self.seen_ids, self.seen_offsets, self.output_ids,
                self.output_offsets, self.bias_ids, self.bias_values, self.bias_offsets, self.eos_ids,
                self.bitmask, self.top_n)
