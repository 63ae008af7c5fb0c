"""The sampler (sagellm/engine/sampler.py), both ways it runs: the fused CPU kernel and the torch
operators. Draw frequencies against transformers' own warpers, seeded draws independent of the
batch, the two implementations against each other, and one bad row failing alone."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper, TypicalLogitsWarper)

from sagellm.engine import sampler, sampler_torch
from sagellm.engine.sampling_batch import INDEX, SamplingBatch
from sagellm.engine.sampling_params import SamplingParams
from sagellm.engine.sequence import Sequence

EOS = (2,)
PROMPT = [5, 7, 7, 11, 3]
OUTPUT = [13, 5, 13, 13, 17]


class Mask:
    """A grammar's matcher as the sampler sees it: fills its row of the bitmask."""

    def __init__(self, allowed: list[int]):
        self.allowed = allowed

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        words = [0] * bitmask.shape[1]
        for t in self.allowed:
            words[t // 32] |= 1 << (t % 32)
        bitmask[row] = torch.tensor([w - 2**32 if w >= 2**31 else w for w in words], dtype=torch.int32)


def seq(params: SamplingParams, output=OUTPUT, matcher=None, prompt=PROMPT) -> Sequence:
    s = Sequence("r", prompt, params, None)
    s.output_ids = list(output)
    s.matcher = matcher
    return s


def run(impl, ops, logits: torch.Tensor, seqs: list[Sequence], index: int | None = None):
    """(tokens, logprobs, top ids, top logprobs) from one implementation; `index` stands in for
    every row's token index (the length of its output)."""
    batch = SamplingBatch(seqs, EOS, logits.shape[1])
    if index is not None:
        batch.iparams[:, INDEX] = index
    if impl == "kernel":
        return ops.sample_rows(logits, *batch.kernel_args())
    return sampler_torch.sample_rows(logits.float().clone(), batch)


def sampled(**kw) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 8, "do_sample": True, "logprobs": False, **kw})


# ---- frequencies of many seeded draws against the filtered softmax ----

def zipf_logits(vocab: int, seed: int) -> torch.Tensor:
    """A language-model-like row: p_i ~ 1 / rank^1.2, ranks shuffled over the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(vocab, generator=g).double()
    return -1.2 * torch.log1p(ranks) + 0.01 * torch.randn(vocab, generator=g, dtype=torch.float64)


def long_tail_logits(vocab: int, seed: int) -> torch.Tensor:
    """100 likely tokens, then thousands between 10 and 12 nats below the best, which together carry
    a few % of the mass: top_p 0.99, typical_p and large top_k need candidates from the tail."""
    g = torch.Generator().manual_seed(seed)
    x = -11.0 - torch.rand(vocab, generator=g, dtype=torch.float64)
    head = torch.randperm(vocab, generator=g)[:100]
    x[head] = -1.2 * torch.log1p(torch.arange(100, dtype=torch.float64))
    return x


def history(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """A prompt and an output made of the row's likeliest tokens, so penalties move real mass."""
    t = x.topk(6).indices.tolist()
    return [t[0], t[1], t[1], t[5]], [t[2], t[0], t[2], t[2], t[3]]


def penalised(x: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """The penalties and bias, written out as their definitions say."""
    x = x.clone()
    for t in set(prompt + output):
        x[t] = x[t] * p.repetition_penalty if x[t] < 0 else x[t] / p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    for t, b in p.logit_bias:
        x[t] += b
    return x


def expected_probs(x: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """transformers' warpers, in generate's order, in float64."""
    scores = penalised(x, p, prompt, output)[None]
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        warpers.append(MinPLogitsWarper(p.min_p))
    if p.typical_p < 1:
        warpers.append(TypicalLogitsWarper(p.typical_p))
    for w in warpers:
        scores = w(None, scores)
    return scores[0].softmax(-1)


def assert_fits(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """No draw of a filtered token, and Pearson's chi-square test over the tokens expected at
    least 5 times (the rest pooled) at the 0.1 % level."""
    n = counts.sum().item()
    assert counts[probs == 0].sum() == 0, f"filtered tokens drawn: {(counts * (probs == 0)).nonzero()[:, 0].tolist()}"
    expected = probs * n
    big = expected >= 5
    obs, exp = counts[big].double(), expected[big]
    rest_o, rest_e = counts[~big].sum().double(), expected[~big].sum()
    if rest_e >= 5:
        obs, exp = torch.cat([obs, rest_o[None]]), torch.cat([exp, rest_e[None]])
    elif rest_e > 0:  # too few to stand alone: pooled with the least likely bin
        i = exp.argmin()
        obs[i] += rest_o
        exp[i] += rest_e
    chi2 = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2 / 2).item()
    assert p_value > 1e-3, f"chi2 {chi2:.1f} with {dof} degrees of freedom: p = {p_value:.2e}"


CASES = [
    ("zipf", {"temperature": 0.7}),
    ("zipf", {"top_k": 30}),
    ("zipf", {"top_p": 0.8}),
    ("zipf", {"min_p": 0.05}),
    ("zipf", {"typical_p": 0.7}),
    ("zipf", {"temperature": 1.3, "top_k": 200, "top_p": 0.9}),
    ("zipf", {"top_p": 0.9, "min_p": 0.02}),
    ("zipf", {"temperature": 0.8, "top_k": 100, "top_p": 0.95, "min_p": 0.01, "typical_p": 0.9}),
    ("zipf", {"top_p": 0.9, "repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.4,
              "logit_bias": ((3, 2.0), (900, 4.0), (2, 1.0))}),
    ("tail", {}),
    ("tail", {"top_p": 0.99}),
    ("tail", {"top_k": 2000, "temperature": 0.9}),
    ("tail", {"typical_p": 0.95}),
]


# The long tail exercises the kernel's widening of its candidates, which the torch operators (one
# sort over every token) do not have, and costs them 10-15 s a case: it runs on the kernel only.
RUNS = [(impl, shape, kw) for impl in ("kernel", "torch") for shape, kw in CASES if impl == "kernel" or shape == "zipf"]


@pytest.mark.parametrize("impl,shape,kw", RUNS, ids=[f"{i}-{s}-{kw}" for i, s, kw in RUNS])
def test_draw_frequencies_match_the_filtered_softmax(ops, impl, shape, kw):
    vocab = 1000 if shape == "zipf" else 6000
    x = zipf_logits(vocab, 0) if shape == "zipf" else long_tail_logits(vocab, 1)
    p = sampled(**kw)
    prompt, output = history(x)
    probs = expected_probs(x, p, prompt, output)
    rows, rounds = 2000, 10  # 20,000 draws: 2,000 seeds, 10 token indexes each
    params = [SamplingParams(**{**p.__dict__, "seed": s}) for s in range(rows)]
    counts = torch.zeros(vocab, dtype=torch.int64)
    logits = x.float()[None].expand(rows, vocab).contiguous()
    seqs = [seq(q, output, prompt=prompt) for q in params]
    for index in range(rounds):
        tokens = run(impl, ops, logits, seqs, index)[0]
        assert (tokens >= 0).all()
        counts += torch.bincount(tokens, minlength=vocab)
    assert_fits(counts, probs)


# ---- seeded rows do not depend on their batch ----

def neighbours(vocab: int, n: int, seed: int):
    """n other rows: their own logits and every kind of parameters."""
    g = torch.Generator().manual_seed(seed)
    kinds = [SamplingParams(max_new_tokens=8), sampled(temperature=1.5, seed=seed), sampled(top_k=3, seed=seed + 1),
             sampled(top_p=0.5, typical_p=0.8, seed=seed + 2),
             SamplingParams(max_new_tokens=8, repetition_penalty=1.5, top_n_tokens=4, min_new_tokens=8),
             sampled(min_p=0.2, frequency_penalty=1.0, logit_bias=((1, 5.0),), seed=seed + 3)]
    logits = torch.randn(n, vocab, generator=g) * 3
    return logits, [seq(kinds[i % len(kinds)], matcher=Mask(list(range(0, vocab, 3))) if i % 5 == 4 else None)
                    for i in range(n)]


@pytest.mark.parametrize("impl", ["kernel", "torch"])
@pytest.mark.parametrize("kw", [{"temperature": 0.8, "top_p": 0.95}, {"top_k": 50, "repetition_penalty": 1.1},
                                {"temperature": 1.0}, {"min_p": 0.05, "typical_p": 0.9}])
def test_seeded_draws_do_not_depend_on_the_batch(ops, impl, kw):
    vocab = 4000
    mine = zipf_logits(vocab, 3).float()[None]
    draws = {}
    for size, position in ((1, 0), (16, 5), (64, 63)):
        others, other_seqs = neighbours(vocab, size - 1, seed=size)
        logits = torch.cat([others[:position], mine, others[position:]])
        got = []
        for seed in range(40):
            seqs = other_seqs[:position] + [seq(sampled(seed=seed, **kw))] + other_seqs[position:]
            got.append(run(impl, ops, logits, seqs, index=seed % 7)[0][position].item())
        draws[size] = got
    assert draws[1] == draws[16] == draws[64]
    assert len(set(draws[1])) > 3  # and the seeds do draw different tokens


def test_kernel_and_torch_operators_agree(ops):
    """Same tokens, logprobs and alternatives for a mixed batch, float32 and bf16 logits."""
    vocab = 3001  # not a multiple of 16 or 32: every loop's tail
    for dtype in (torch.float32, torch.bfloat16):
        logits, seqs = neighbours(vocab, 48, seed=7)
        logits = torch.cat([logits, long_tail_logits(vocab, 8).float()[None].expand(16, vocab)]).to(dtype)
        seqs += [seq(sampled(seed=s, top_p=0.99, logprobs=True, top_n_tokens=3)) for s in range(16)]
        for index in range(5):
            k = run("kernel", ops, logits.contiguous(), seqs, index)
            t = run("torch", ops, logits, seqs, index)
            assert torch.equal(k[0], t[0])
            # the same alternatives, up to the order of equal logits (bf16 has ties)
            asked = k[2][:, 0] >= 0
            rows = torch.arange(len(seqs))[asked, None]
            assert torch.equal(logits[rows, k[2][asked]], logits[rows, t[2][asked]])
            torch.testing.assert_close(k[1], t[1], atol=1e-4, rtol=1e-4, equal_nan=True)
            torch.testing.assert_close(k[3], t[3], atol=1e-4, rtol=1e-4, equal_nan=True)


def test_logprobs_are_the_penalised_models_before_the_grammar_and_filters(ops):
    vocab = 500
    x = zipf_logits(vocab, 5).float()
    allowed = list(range(1, vocab, 2))
    params = SamplingParams(max_new_tokens=8, do_sample=True, top_k=5, repetition_penalty=1.2, logprobs=True,
                            top_n_tokens=4, seed=1)
    prompt, output = history(x.double())
    ref = penalised(x.double(), params, prompt, output).log_softmax(-1)
    for impl in ("kernel", "torch"):
        token, logprob, top_ids, top_lp = (t[0] for t in run(impl, ops, x[None].contiguous(),
                                                              [seq(params, output, Mask(allowed), prompt)]))
        assert token.item() in allowed
        assert logprob.item() == pytest.approx(ref[token].item(), abs=1e-5)
        values, ids = ref.topk(4)  # the model's own best, whatever the grammar allows
        assert top_ids.tolist() == ids.tolist()
        torch.testing.assert_close(top_lp.double(), values, atol=1e-5, rtol=0)


# ---- one bad row fails alone ----

@pytest.mark.parametrize("use_kernel", [True, False])
def test_a_row_that_cannot_be_sampled_fails_alone(ops, use_kernel):
    vocab = 256
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    logits[2] = float("nan")  # a broken row
    seqs = [seq(sampled(seed=1, top_p=0.9)), seq(sampled(seed=1, temperature=float("nan"))),
            seq(SamplingParams(max_new_tokens=8)), seq(SamplingParams(max_new_tokens=8, logprobs=True))]
    out = sampler.sample(logits.clone(), seqs, EOS, ops if use_kernel else None)
    assert [s.error is None for s in out] == [True, False, False, True]
    assert 0 <= out[0].token_id < vocab and out[3].token_id == logits[3].argmax().item()
    assert out[3].logprob == pytest.approx(logits[3].log_softmax(-1).max().item(), abs=1e-5)
