"""The sampler's steps in torch operators for a whole batch: what the fused CPU kernel
(sagellm/model/csrc/sampler.cpp) does, for GPUs and for CPUs without the kernels, and the reference
the tests hold the kernel to. Same order and arithmetic; one sort for the rows with filters (a
second, by distance to the entropy, only for typical_p rows) where the kernel sorts candidates.

The random stream: a row's key is mix64(seed ^ mix64(index + golden)) for the request's seed and
the token's index in its output; token i's Exp(1) variate is -log(u) with
u = ((h >> 9) + 0.5) / 2^23 and h = hash32(hash32(i ^ key_lo) ^ key_hi).
"""

from __future__ import annotations

import torch

from sagellm.engine import sampling_batch as sb

_M64 = 2**64 - 1
_M32 = 2**32 - 1


def _mix64(z: int) -> int:  # splitmix64's finaliser, on Python ints
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def row_key(seed: int, index: int) -> int:
    return _mix64((seed & _M64) ^ _mix64((index + 0x9E3779B97F4A7C15) & _M64))


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """x: int64 holding uint32 values. Multipliers below 2^31 keep every product below 2^63."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def exponentials(keys: list[int], vocab: int, device) -> torch.Tensor:
    """[len(keys), vocab] float32: the Exp(1) variate of every token for each row key."""
    k = torch.tensor([[key & _M32, key >> 32] for key in keys], dtype=torch.int64, device=device)
    ids = torch.arange(vocab, dtype=torch.int64, device=device)[None, :]
    h = _hash32(_hash32(ids ^ k[:, :1]) ^ k[:, 1:])
    u = ((h >> 9).float() + 0.5) * 2.0**-23
    return -torch.log(u)


def _flat(ids: torch.Tensor, offsets: torch.Tensor, vocab: int):
    """CSR token ids -> (row of each id, row * vocab + id), ids outside the vocabulary dropped."""
    rows = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=ids.device), offsets.diff())
    ids = ids.long()
    ok = (ids >= 0) & (ids < vocab)
    return rows[ok], rows[ok] * vocab + ids[ok]


def _penalise(x: torch.Tensor, b: sb.SamplingBatch) -> None:
    n, vocab = x.shape
    dev = x.device
    f = b.fparams.to(dev)
    flat_x = x.view(-1)
    out_rows, out_flat = _flat(b.output_ids.to(dev), b.output_offsets.to(dev), vocab)
    rep = f[:, sb.REPETITION]
    if (rep != 1).any():  # from the model's logits, so a token seen twice is penalised once
        seen_rows, seen_flat = _flat(b.seen_ids.to(dev), b.seen_offsets.to(dev), vocab)
        rows, where = torch.cat([seen_rows, out_rows]), torch.cat([seen_flat, out_flat])
        keep = rep[rows] != 1
        rows, where = rows[keep], where[keep]
        v = flat_x[where]
        flat_x[where] = torch.where(v < 0, v * rep[rows], v / rep[rows])
    if (f[:, sb.FREQUENCY] != 0).any() or (f[:, sb.PRESENCE] != 0).any():
        counts = torch.zeros_like(x)
        counts.view(-1).index_add_(0, out_flat, torch.ones_like(out_flat, dtype=x.dtype))
        x -= f[:, sb.FREQUENCY, None] * counts + f[:, sb.PRESENCE, None] * (counts > 0).to(x.dtype)
    if b.bias_ids.numel():
        _, where = _flat(b.bias_ids.to(dev), b.bias_offsets.to(dev), vocab)
        ok = (b.bias_ids >= 0) & (b.bias_ids < vocab)
        flat_x.index_add_(0, where, b.bias_values.to(dev)[ok.to(dev)])
    ban = (b.iparams[:, sb.FLAGS] & sb.BAN_EOS).nonzero()[:, 0].to(dev)
    if ban.numel() and b.eos_ids.numel():
        x[ban[:, None], b.eos_ids.to(dev)[None, :]] = float("-inf")


def _filter(s: torch.Tensor, f: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """s: [R, V] scaled logits (max 0) of rows with a filter -> [R, V] bool, the tokens kept."""
    ss, order = s.sort(dim=-1, descending=True, stable=True)
    w = ss.exp()
    kept = ss > float("-inf")
    pos = torch.arange(s.shape[1], device=s.device)[None, :]
    k = top_k[:, None]
    kth = ss.gather(1, (k - 1).clamp(0, s.shape[1] - 1))
    kept &= (k <= 0) | (ss >= kth)  # equals of the k-th best stay
    top_p = f[:, sb.TOP_P, None]
    wk = w * kept
    norm = torch.where(k > 0, wk.sum(-1, keepdim=True), w.sum(-1, keepdim=True))
    before = wk.cumsum(-1) - wk
    kept &= (top_p >= 1) | (before < top_p * norm) | (pos == 0)
    kept &= w >= f[:, sb.MIN_P, None]  # relative to the best, whose w is 1
    typical = f[:, sb.TYPICAL_P, None]
    if (typical < 1).any():
        wk = w * kept
        total = wk.sum(-1, keepdim=True)
        logq = ss - total.log()
        q = wk / total
        h = -(q * logq).nan_to_num().sum(-1, keepdim=True)
        d = torch.where(kept, (-logq - h).abs(), float("inf"))
        _, by_d = d.sort(dim=-1, stable=True)
        q2 = q.gather(1, by_d)
        keep2 = (((q2.cumsum(-1) - q2) < typical) | (pos == 0)) & kept.gather(1, by_d)
        kept = torch.where(typical < 1, torch.zeros_like(kept).scatter(1, by_d, keep2), kept)
    return torch.zeros_like(kept).scatter(1, order, kept)


def sample_rows(x: torch.Tensor, b: sb.SamplingBatch):
    """x: [N, V] float32 logits, changed in place. -> (tokens [N] int64, -1 where none could be
    drawn; logprobs [N] float32, NaN where not asked; top ids [N, top_n]; top logprobs [N, top_n])."""
    n, vocab = x.shape
    dev = x.device
    _penalise(x, b)
    flags = b.iparams[:, sb.FLAGS]
    logprobs = torch.full((n,), float("nan"), device=dev)
    top_ids = torch.full((n, b.top_n), -1, dtype=torch.int64, device=dev)
    top_lp = torch.full((n, b.top_n), float("nan"), device=dev)
    lse = torch.full((n,), float("nan"), device=dev)
    asked = (flags & (sb.LOGPROB | sb.TOP_N)).nonzero()[:, 0].to(dev)
    if asked.numel():  # before the grammar and the warpers
        lse[asked] = torch.logsumexp(x[asked], dim=-1)
        with_top = (flags & sb.TOP_N).nonzero()[:, 0].to(dev)
        if with_top.numel() and b.top_n:
            values, ids = torch.topk(x[with_top], b.top_n, dim=-1)
            top_ids[with_top], top_lp[with_top] = ids, values - lse[with_top, None]
    grammar = b.iparams[:, sb.GRAMMAR_ROW]
    rows = (grammar >= 0).nonzero()[:, 0]
    if rows.numel():
        bits = torch.arange(32, dtype=torch.int32)
        allowed = ((b.bitmask[grammar[rows]][:, :, None] >> bits) & 1).view(rows.numel(), -1)[:, :vocab]
        x[rows.to(dev)] = x[rows.to(dev)].masked_fill(allowed.to(dev) == 0, float("-inf"))
    tokens = torch.full((n,), -1, dtype=torch.int64, device=dev)
    f = b.fparams.to(dev)
    temperature = f[:, sb.TEMPERATURE]
    bad = x.isnan().any(-1) | ~(x.amax(-1) > float("-inf"))
    greedy = (temperature == 0).nonzero()[:, 0]
    if greedy.numel():
        tokens[greedy] = x[greedy].argmax(-1)
    sampled = (temperature != 0).nonzero()[:, 0]
    if sampled.numel():
        xs = x[sampled]
        s = (xs - xs.amax(-1, keepdim=True)) / temperature[sampled, None]
        s = torch.where(xs == float("-inf"), xs, s)
        fs, top_k = f[sampled], b.iparams[sampled.cpu(), sb.TOP_K].to(dev)
        keep = s > float("-inf")
        filtered = ((top_k > 0) | (fs[:, sb.TOP_P] < 1) | (fs[:, sb.MIN_P] > 0) | (fs[:, sb.TYPICAL_P] < 1)).nonzero()[:, 0]
        if filtered.numel():
            keep[filtered] = _filter(s[filtered], fs[filtered], top_k[filtered])
        seeds, index = b.iparams[sampled.cpu(), sb.SEED].tolist(), b.iparams[sampled.cpu(), sb.INDEX].tolist()
        e = exponentials([row_key(sd, i) for sd, i in zip(seeds, index)], vocab, dev)
        race = torch.where(keep, s.exp() / e, 0.0)
        best, won = race.max(-1)
        tokens[sampled] = torch.where(best > 0, won, -1)
    tokens[bad] = -1
    picked = tokens.clamp(min=0)
    logprobs = torch.where((flags.to(dev) & sb.LOGPROB) != 0, x.gather(1, picked[:, None])[:, 0] - lse, logprobs)
    return tokens, logprobs, top_ids, top_lp
