"""sagellm's fused CPU kernels (sagellm/model/cpu_kernels.py) against the torch operators they
replace, and the engine with them off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sagellm.model.attention import StepMetadata
from sagellm.model.attention_ops import decode_attention
from sagellm.engine.kv_cache import PagedKVCache
from sagellm.model import cpu_kernels


def _decode_case(dtype, batch, heads, kv_heads, head_dim, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    bs, num_blocks = 16, 512
    cache = PagedKVCache(1, num_blocks, bs, kv_heads, head_dim, dtype)
    cache._store.copy_(torch.randn(cache._store.shape, generator=g))
    nb = -(-max(lengths) // bs)
    table = torch.randperm(num_blocks, generator=g)[:batch * nb].view(batch, nb)  # scattered blocks
    lens = torch.tensor(lengths)
    bias = torch.zeros(batch, 1, 1, nb * bs).masked_fill_(torch.arange(nb * bs) >= lens[:, None, None, None], float("-inf"))
    q = torch.randn(batch, heads + kv_heads, head_dim, generator=g).to(dtype)[:, :heads]  # strided rows, as served
    return cache, table, lens, bias, q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 128), (4, 4, 64), (16, 2, 128)])
def test_decode_attention_equals_torch(ops, dtype, heads, kv_heads, head_dim):
    lengths = [1, 15, 16, 17, 33, 100, 250]  # block edges, a single token, long contexts
    cache, table, lens, bias, q = _decode_case(dtype, len(lengths), heads, kv_heads, head_dim, lengths)
    k_cache, v_cache = cache.keys[0], cache.values[0]
    meta = StepMetadata(cache, None, len(lengths), table, bias, [], decode_lens=lens)
    expected = decode_attention(q.transpose(0, 1), k_cache, v_cache, meta, 0.125)  # torch operators
    got = ops.paged_decode_attention(q, k_cache, v_cache, table, lens, 16, 0.125)
    assert got.shape == expected.shape and got.dtype == dtype
    # The torch path rounds scores and probabilities to bf16 on the way; the kernel keeps float32.
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.float(), expected.float(), **tol)
    # and through paged_attention's own dispatch, with the kernels on the step's metadata
    meta.kernels = ops
    torch.testing.assert_close(decode_attention(q.transpose(0, 1), k_cache, v_cache, meta, 0.125), got)


def _nearly_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal but for the order of a sum (the norm) or torch's own exp (silu): float32 to rounding,
    bf16 at most one step apart and almost always equal."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if got.dtype == torch.bfloat16:
        assert (got != expected).float().mean() < 0.01
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)
    else:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_norms_and_swiglu_equal_torch(ops, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 576, generator=g) * 4).to(dtype)
    delta = torch.randn(rows, 576, generator=g).to(dtype)
    w = torch.randn(576, generator=g).to(dtype)
    _nearly_equal(ops.rms_norm(x, w, 1e-5), w * F.rms_norm(x, (576,), eps=1e-5))
    h = x.clone()
    y = ops.add_rms_norm(h, delta, w, 1e-5)
    assert torch.equal(h, x + delta)  # the residual, added in place and rounded as torch rounds
    _nearly_equal(y, w * F.rms_norm(x + delta, (576,), eps=1e-5))
    gu = (torch.randn(rows, 2 * 1536, generator=g) * 3).to(dtype)
    _nearly_equal(ops.silu_mul(gu), F.silu(gu[:, :1536]) * gu[:, 1536:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [49152, 1000, 7])
def test_argmax_rows_equals_torch_argmax(ops, dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g).to(dtype)
    x[1] = 0.0  # every entry ties: the first wins
    x[2, vocab // 2:] = 50.0  # ties between lanes and in the tail
    x[3] = float("-inf")
    x[4, -1] = 99.0  # the very last entry
    x[5] = x[5].round()  # many ties among integers (bf16 holds them exactly)
    assert torch.equal(ops.argmax_rows(x), torch.argmax(x.float(), dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 37])
def test_rope_write_kv_equals_rotate_and_index_copy(ops, dtype, tokens):
    from sagellm.model.fast_decoder import _rotate

    heads, kv_heads, d = 9, 3, 64
    g = torch.Generator().manual_seed(tokens)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g) * 3).to(dtype)
    angles = torch.rand(tokens, d // 2, generator=g) * 100
    cos, sin = (torch.cat((f(angles), f(angles)), dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    slots = torch.randperm(200, generator=g)[:tokens]
    expected_qk = _rotate(qkv[:, :(heads + kv_heads) * d].view(tokens, -1, d), cos[:, None], sin[:, None])
    k_ref, v_ref = torch.zeros(kv_heads, 200, d, dtype=dtype), torch.zeros(kv_heads, 200, d, dtype=dtype)
    k_ref.index_copy_(1, slots, expected_qk[:, heads:].transpose(0, 1))
    v_ref.index_copy_(1, slots, qkv[:, (heads + kv_heads) * d:].view(tokens, kv_heads, d).transpose(0, 1))
    k_cache, v_cache = torch.zeros_like(k_ref), torch.zeros_like(v_ref)
    qk = ops.rope_write_kv(qkv, cos, sin, slots, k_cache, v_cache, heads, kv_heads)
    assert torch.equal(qk, expected_qk)  # the same roundings, in the same places
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ctx,t", [(0, 64), (0, 200), (37, 64), (300, 129), (1000, 65)])
def test_blocked_prefill_with_causal_softmax_equals_sdpa(ops, dtype, ctx, t):
    from sagellm.model.attention_ops import blocked_prefill_attention

    g = torch.Generator().manual_seed(ctx + t)
    q, k, v = (torch.randn(n, ctx + t if n == 3 else t, 64, generator=g).to(dtype) for n in (9, 3, 3))
    mask = torch.arange(ctx + t)[None, :] <= (ctx + torch.arange(t))[:, None]
    expected = F.scaled_dot_product_attention(q[None].float(), k[None].float(), v[None].float(), attn_mask=mask,
                                              enable_gqa=True)[0]
    got = blocked_prefill_attention(q, k, v, ctx, None, ops)
    plain = blocked_prefill_attention(q, k, v, ctx, None)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.float(), expected, **tol)
    torch.testing.assert_close(got, plain, **tol)  # and the torch operators it replaces


def test_kernels_refuse_bad_input(ops):
    x = torch.randn(4, 576, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.rms_norm(x, torch.ones(576, dtype=torch.float16), 1e-5)
    cache, table, lens, _, q = _decode_case(torch.float32, 2, 9, 3, 32, [5, 9])
    with pytest.raises(RuntimeError, match="head dim 32"):
        ops.paged_decode_attention(q, cache.keys[0], cache.values[0], table, lens, 16, 0.1)


def test_engine_output_same_with_kernels_off(chat_ids, loaded_model):
    """float32: the kernels change no greedy token of the bundled model."""
    from sagellm.engine.engine import EngineConfig, LLMEngine
    from sagellm.engine.sampling_params import SamplingParams
    from sagellm.model.loader import load_weights
    from sagellm.settings import Settings

    assert loaded_model.model.kernels is not None  # on by default
    assert loaded_model.model.dtype == torch.float32
    plain = load_weights(loaded_model.source.path, Settings(dtype="float32", cpu_kernels=False), "cpu")
    assert plain.kernels is None and plain.fast.kernels is None
    prompts = [chat_ids(q) for q in ("Why is the sky blue?", "Name three prime numbers.", "Write a haiku.")]
    outputs = []
    for model in (loaded_model.model, plain):
        engine = LLMEngine(model, loaded_model.tokenizer, EngineConfig(8, 512, 2048, 256), loaded_model.eos_token_ids)
        engine.start()
        try:
            handles = [engine.submit(p, SamplingParams(max_new_tokens=24)) for p in prompts]
            outputs.append([[e.token_id for e in h if e.token_id >= 0] for h in handles])
        finally:
            engine.stop()
    assert outputs[0] == outputs[1]


# ---- sliding windows, logit softcapping and attention sinks (Mistral, Gemma 2, gpt-oss, ...) ----

FEATURES = [dict(window=20, softcap=0.0, sinks=False), dict(window=0, softcap=5.0, sinks=False),
            dict(window=0, softcap=0.0, sinks=True), dict(window=33, softcap=0.5, sinks=True)]


def _eager(q, k, v, qpos, scale, window, softcap, sinks):
    """transformers' eager attention in float64, one sequence: q [H, n, D] at positions qpos
    [n]; k, v [KVH, keys, D] at positions 0 .. keys - 1; sinks [H] or None -> [H, n, D]."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = q @ k.transpose(1, 2) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    kpos = torch.arange(k.shape[1])[None, :]
    hidden = (kpos > qpos[:, None]) | ((kpos <= qpos[:, None] - window) if window else False)
    scores = scores.masked_fill(hidden, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.double().view(-1, 1, 1).expand(-1, scores.shape[1], 1)], dim=-1)
    return (scores.softmax(-1)[..., :k.shape[1]] @ v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
def test_decode_attention_features_equal_eager(ops, dtype, feature):
    lengths = [1, 15, 20, 21, 33, 34, 100, 250]  # inside, at and past the window; block edges
    heads, kv_heads, d = 8, 2, 64
    cache, table, lens, bias, q = _decode_case(dtype, len(lengths), heads, kv_heads, d, lengths, seed=3)
    window, softcap = feature["window"], feature["softcap"]
    sinks = torch.randn(heads, generator=torch.Generator().manual_seed(4)) * 2 if feature["sinks"] else None
    k_cache, v_cache = cache.keys[0], cache.values[0]
    got = ops.paged_decode_attention(q, k_cache, v_cache, table, lens, 16, 0.125, window, softcap,
                                     None if sinks is None else sinks.to(dtype))
    meta = StepMetadata(cache, None, len(lengths), table, bias, [], decode_lens=lens)
    plain = decode_attention(q.transpose(0, 1), k_cache, v_cache, meta, 0.125, window, softcap, sinks)
    for b, n in enumerate(lengths):
        slots = (table[b, torch.arange(n) // 16] * 16 + torch.arange(n) % 16)
        want = _eager(q[b][:, None], k_cache[:, slots], v_cache[:, slots], torch.tensor([n - 1]), 0.125, window,
                      softcap, None if sinks is None else sinks.to(dtype))[:, 0]
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[b].double(), want, **tol)  # the kernel
        torch.testing.assert_close(plain[b].double(), want, **tol)  # the torch operators it replaces


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
@pytest.mark.parametrize("ctx,t", [(0, 64), (0, 150), (37, 64), (300, 129), (5, 7)])
def test_blocked_prefill_features_equal_eager(ops, dtype, feature, ctx, t):
    from sagellm.model.attention_ops import blocked_prefill_attention

    g = torch.Generator().manual_seed(ctx + t)
    q, k, v = (torch.randn(n, ctx + t if n == 2 else t, 64, generator=g).to(dtype) for n in (8, 2, 2))
    window, softcap = feature["window"], feature["softcap"]
    sinks = (torch.randn(8, generator=g) * 2).to(dtype) if feature["sinks"] else None
    want = _eager(q, k, v, ctx + torch.arange(t), 0.125, window, softcap, sinks)
    got = blocked_prefill_attention(q, k, v, ctx, 0.125, ops, window, softcap, sinks)
    plain = blocked_prefill_attention(q, k, v, ctx, 0.125, None, window, softcap, sinks)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(plain.double(), want, **tol)


def test_softcap_tanh_is_accurate_over_its_whole_range(ops):
    """The kernels' vectorised tanh against torch's, from tiny to saturated arguments: one query
    with a single key per score, so each probability isolates one tanh."""
    x = torch.cat([torch.linspace(-12, 12, 2001), torch.logspace(-7, 0, 200), -torch.logspace(-7, 0, 200)])
    # causal_softmax over two keys [x, 0] (softcap 1): p0 = sigmoid(tanh(x) - tanh(0)).
    scores = torch.stack([x, torch.zeros_like(x)], dim=-1).contiguous()  # [rows, 2]
    probs = ops.causal_softmax(scores, 1.0, 1, 1, 0, 1.0)
    want = torch.sigmoid(torch.tanh(x.double()))
    torch.testing.assert_close(probs[:, 0].double(), want, atol=2e-7, rtol=0)


def test_build_key_covers_every_source_and_header(tmp_path, monkeypatch):
    # Every file in csrc/ is compiled or included: each must be in SOURCES or HEADERS, so that a
    # change to any of them (a header's too) names a new build instead of loading a stale one.
    listed = {p.name for p in cpu_kernels.SOURCES + cpu_kernels.HEADERS}
    assert listed == {p.name for p in cpu_kernels.CSRC.iterdir() if p.suffix in (".cpp", ".h")}
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for p in cpu_kernels.SOURCES + cpu_kernels.HEADERS:
        (csrc / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(cpu_kernels, "SOURCES", tuple(csrc / p.name for p in cpu_kernels.SOURCES))
    monkeypatch.setattr(cpu_kernels, "HEADERS", tuple(csrc / p.name for p in cpu_kernels.HEADERS))
    before = cpu_kernels.library_path(tmp_path)
    with open(csrc / "flash_softmax.h", "a") as f:
        f.write("\n")
    assert cpu_kernels.library_path(tmp_path) != before
