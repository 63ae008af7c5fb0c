// Fused CPU kernels for the decode step (AVX-512, float32 and bfloat16), built and loaded by
// sagellm/model/cpu_kernels.py. Each replaces a run of small torch operators whose per-call cost
// dominated a batched decode step on this project's 2-core machines (docs/performance.md):
//   paged_decode_attention  one query token per sequence over its paged K/V, read in place
//                           (the torch path gathers every context into a copy first);
//   rms_norm, add_rms_norm  transformers' LlamaRMSNorm, optionally after the residual add;
//   silu_mul                SwiGLU's silu(gate) * up on the fused gate/up projection;
//   argmax_rows             greedy picks straight off bf16 logits (torch first converts them);
//   rope_write_kv           rotary embedding of the q and k heads, and the new k and v stored in
//                           the paged cache, straight from the fused q/k/v projection.
// Arithmetic follows the torch operators it replaces: float32 inside, results rounded to the
// tensor's dtype where torch rounds them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// float32 -> bfloat16 rounding to nearest even, NaN kept a (quiet) NaN, as c10::BFloat16 does.
inline void store16(bf16* p, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

// e^x: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p of degree 6 (relative error ~2e-7).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// ---- decode attention ----

// In place: s[0 .. n) <- softmax(s).
inline void softmax_inplace(float* s, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), mv));
    _mm512_storeu_ps(s + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), mv));
    _mm512_mask_storeu_ps(s + i, k, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (i = 0; i + 16 <= n; i += 16) _mm512_storeu_ps(s + i, _mm512_mul_ps(_mm512_loadu_ps(s + i), inv));
  for (; i < n; ++i) s[i] *= _mm512_cvtss_f32(inv);
}

// Prefetches one cache block's rows (block_size x D elements, contiguous) into L1 (T0) or L2 (T1).
template <int Hint, typename T>
inline void prefetch_rows(const T* p, int64_t elements) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < elements * static_cast<int64_t>(sizeof(T)); off += 64)
    _mm_prefetch(c + off, static_cast<_mm_hint>(Hint));
}

// G query heads share one KV head; the head dim is NC * 16. One work item is one (sequence, KV
// head): its G scaled queries stay in registers while the context's keys stream past (two tokens
// at a time, so the FMA chains overlap), then the probabilities weight the values.
template <typename T, int G, int NC>
void decode_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                      const at::Tensor& table, const at::Tensor& lens, int64_t bs, float scale,
                      at::Tensor& out) {
  constexpr int64_t D = NC * 16;
  const int64_t B = q.size(0), H = q.size(1), KVH = kc.size(0), S = kc.size(1), NB = table.size(1);
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / KVH, h = w % KVH, L = lp[b];
      const int64_t* blocks = tp + b * NB;
      const T* kh = kp + h * S * D;
      const T* vh = vp + h * S * D;
      auto row = [&](const T* base, int64_t t) { return base + (blocks[t / bs] * bs + t % bs) * D; };
      // The context is scattered over blocks, which the hardware prefetcher cannot follow: fetch
      // the next item's first keys, each next block of keys, and the values for the second pass
      // ahead of use (measured over 30 layers' caches, beyond L3: 25-40 % faster).
      if (w + 1 < end) {
        const int64_t b1 = (w + 1) / KVH, h1 = (w + 1) % KVH;
        prefetch_rows<_MM_HINT_T1>(kp + h1 * S * D + tp[b1 * NB] * bs * D, bs * D);
      }
      scores.resize(G * L);
      float* sc = scores.data();
      __m512 qv[G][NC];
      const __m512 sv = _mm512_set1_ps(scale);
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < NC; ++c)
          qv[g][c] = _mm512_mul_ps(load16(qp + b * qs0 + (h * G + g) * qs1 + 16 * c), sv);
      int64_t t = 0;
      for (; t + 1 < L; t += 2) {
        if (t % bs == 0 || (t + 1) % bs == 0) {  // a new block starts within these two tokens
          const int64_t nb = (t + 1) / bs;
          if ((nb + 1) * bs < L) prefetch_rows<_MM_HINT_T0>(kh + blocks[nb + 1] * bs * D, bs * D);
          prefetch_rows<_MM_HINT_T1>(vh + blocks[nb] * bs * D, bs * D);
        }
        const T* k0 = row(kh, t);
        const T* k1 = row(kh, t + 1);
        __m512 a0[G], a1[G];
        for (int g = 0; g < G; ++g) a0[g] = a1[g] = _mm512_setzero_ps();
        for (int c = 0; c < NC; ++c) {
          const __m512 x0 = load16(k0 + 16 * c), x1 = load16(k1 + 16 * c);
          for (int g = 0; g < G; ++g) {
            a0[g] = _mm512_fmadd_ps(qv[g][c], x0, a0[g]);
            a1[g] = _mm512_fmadd_ps(qv[g][c], x1, a1[g]);
          }
        }
        for (int g = 0; g < G; ++g) {
          sc[g * L + t] = _mm512_reduce_add_ps(a0[g]);
          sc[g * L + t + 1] = _mm512_reduce_add_ps(a1[g]);
        }
      }
      if (t < L) {
        const T* k0 = row(kh, t);
        __m512 a0[G];
        for (int g = 0; g < G; ++g) a0[g] = _mm512_setzero_ps();
        for (int c = 0; c < NC; ++c) {
          const __m512 x0 = load16(k0 + 16 * c);
          for (int g = 0; g < G; ++g) a0[g] = _mm512_fmadd_ps(qv[g][c], x0, a0[g]);
        }
        for (int g = 0; g < G; ++g) sc[g * L + t] = _mm512_reduce_add_ps(a0[g]);
      }
      for (int g = 0; g < G; ++g) softmax_inplace(sc + g * L, L);
      __m512 acc[G][NC];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_setzero_ps();
      for (t = 0; t < L; ++t) {
        if (t % bs == 0 && t + bs < L) prefetch_rows<_MM_HINT_T0>(vh + blocks[t / bs + 1] * bs * D, bs * D);
        const T* v0 = row(vh, t);
        for (int c = 0; c < NC; ++c) {
          const __m512 x = load16(v0 + 16 * c);
          for (int g = 0; g < G; ++g) acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(sc[g * L + t]), x, acc[g][c]);
        }
      }
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < NC; ++c) store16(op + (b * H + h * G + g) * D + 16 * c, acc[g][c]);
    }
  });
}

template <typename T, int NC>
void decode_attention_g(int64_t G, const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                        const at::Tensor& table, const at::Tensor& lens, int64_t bs, float scale,
                        at::Tensor& out) {
  switch (G) {
    case 1: return decode_attention<T, 1, NC>(q, kc, vc, table, lens, bs, scale, out);
    case 2: return decode_attention<T, 2, NC>(q, kc, vc, table, lens, bs, scale, out);
    case 3: return decode_attention<T, 3, NC>(q, kc, vc, table, lens, bs, scale, out);
    case 4: return decode_attention<T, 4, NC>(q, kc, vc, table, lens, bs, scale, out);
    case 5: return decode_attention<T, 5, NC>(q, kc, vc, table, lens, bs, scale, out);
    case 6: return decode_attention<T, 6, NC>(q, kc, vc, table, lens, bs, scale, out);
    case 7: return decode_attention<T, 7, NC>(q, kc, vc, table, lens, bs, scale, out);
    case 8: return decode_attention<T, 8, NC>(q, kc, vc, table, lens, bs, scale, out);
  }
  TORCH_CHECK(false, "paged_decode_attention: ", G, " query heads per KV head (1 to 8 supported)");
}

template <typename T>
void decode_attention_dispatch(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                               const at::Tensor& table, const at::Tensor& lens, int64_t bs, float scale,
                               at::Tensor& out) {
  const int64_t G = q.size(1) / kc.size(0);
  switch (q.size(2)) {
    case 64: return decode_attention_g<T, 4>(G, q, kc, vc, table, lens, bs, scale, out);
    case 128: return decode_attention_g<T, 8>(G, q, kc, vc, table, lens, bs, scale, out);
  }
  TORCH_CHECK(false, "paged_decode_attention: head dim ", q.size(2), " (64 or 128 supported)");
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_table, const at::Tensor& context_lens,
                                  int64_t block_size, double scale) {
  // q: [B, H, D] (rows may be strided, the head dim contiguous); k_cache, v_cache: [KVH, slots, D]
  // contiguous; block_table: [B, NB] int64; context_lens: [B] int64, each >= 1 -> [B, H, D].
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [B, H, D] with a contiguous last dim");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the KV cache must share a dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(0) == 0, "query heads must be a multiple of KV heads");
  const auto table = block_table.contiguous();
  const auto lens = context_lens.contiguous();
  TORCH_CHECK(table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 tables");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const float s = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16) decode_attention_dispatch<bf16>(q, k_cache, v_cache, table, lens, block_size, s, out);
  else if (q.scalar_type() == at::kFloat) decode_attention_dispatch<float>(q, k_cache, v_cache, table, lens, block_size, s, out);
  else TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 only");
  return out;
}

// ---- RMSNorm (LlamaRMSNorm: weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)) ----

template <typename T>
void rms_norm_rows(T* h, const T* delta, const T* w, T* y, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* hr = h + r * n;
      if (delta != nullptr) {  // h += delta, rounded to h's dtype as torch's add rounds it
        const T* dr = delta + r * n;
        for (int64_t i = 0; i < n; i += 16) store16(hr + i, _mm512_add_ps(load16(hr + i), load16(dr + i)));
      }
      __m512 ss = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; i += 16) {
        const __m512 x = load16(hr + i);
        ss = _mm512_fmadd_ps(x, x, ss);
      }
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / n + eps));
      T* yr = y + r * n;
      for (int64_t i = 0; i < n; i += 16) {
        store16(yr + i, _mm512_mul_ps(load16(hr + i), inv));  // rounded, as .to(input dtype)
        store16(yr + i, _mm512_mul_ps(load16(yr + i), load16(w + i)));
      }
    }
  });
}

at::Tensor norm_impl(const at::Tensor& h, const at::Tensor* delta, const at::Tensor& weight, double eps) {
  TORCH_CHECK(h.is_contiguous() && weight.is_contiguous() && h.size(-1) % 16 == 0, "rms_norm: contiguous rows of 16k");
  TORCH_CHECK(weight.scalar_type() == h.scalar_type(), "rms_norm: weight and input must share a dtype");
  auto y = at::empty_like(h);
  const int64_t n = h.size(-1), rows = h.numel() / n;
  if (h.scalar_type() == at::kBFloat16) {
    rms_norm_rows<bf16>(h.data_ptr<bf16>(), delta ? delta->data_ptr<bf16>() : nullptr, weight.data_ptr<bf16>(),
                        y.data_ptr<bf16>(), rows, n, static_cast<float>(eps));
  } else {
    TORCH_CHECK(h.scalar_type() == at::kFloat, "rms_norm: float32 or bfloat16 only");
    rms_norm_rows<float>(h.data_ptr<float>(), delta ? delta->data_ptr<float>() : nullptr, weight.data_ptr<float>(),
                         y.data_ptr<float>(), rows, n, static_cast<float>(eps));
  }
  return y;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return norm_impl(x, nullptr, weight, eps);
}

// h += delta (in place), then the norm of the new h.
at::Tensor add_rms_norm(at::Tensor& h, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  TORCH_CHECK(delta.is_contiguous() && delta.sizes() == h.sizes() && delta.scalar_type() == h.scalar_type(),
              "add_rms_norm: delta must match h");
  return norm_impl(h, &delta, weight, eps);
}

// ---- SwiGLU: silu(gu[:, :I]) * gu[:, I:], each product of two values rounded as torch rounds ----

template <typename T>
void silu_mul_rows(const T* gu, T* y, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gu + r * 2 * inter;
      const T* u = g + inter;
      T* yr = y + r * inter;
      for (int64_t i = 0; i < inter; i += 16) {
        const __m512 x = load16(g + i);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        store16(yr + i, _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e)));  // silu, rounded
        store16(yr + i, _mm512_mul_ps(load16(yr + i), load16(u + i)));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.size(1) % 32 == 0, "silu_mul: contiguous [T, 2I], I % 16 == 0");
  const int64_t inter = gu.size(1) / 2;
  auto y = at::empty({gu.size(0), inter}, gu.options());
  if (gu.scalar_type() == at::kBFloat16) silu_mul_rows<bf16>(gu.data_ptr<bf16>(), y.data_ptr<bf16>(), gu.size(0), inter);
  else if (gu.scalar_type() == at::kFloat) silu_mul_rows<float>(gu.data_ptr<float>(), y.data_ptr<float>(), gu.size(0), inter);
  else TORCH_CHECK(false, "silu_mul: float32 or bfloat16 only");
  return y;
}

// ---- rotary embedding + KV cache write ----

// x rounded to T's precision (round to nearest even), kept in float32.
inline __m512 round_to(__m512 x, const float*) { return x; }
inline __m512 round_to(__m512 x, const bf16*) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

template <typename T>
void rope_write_kv_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& slots, at::Tensor& k_cache, at::Tensor& v_cache,
                        int64_t heads, int64_t kv_heads, at::Tensor& qk) {
  const int64_t T_ = qkv.size(0), D = cos.size(1), half = D / 2, S = k_cache.size(1);
  const int64_t rows_per_token = heads + 2 * kv_heads;
  const T* xp = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  T* out = qk.data_ptr<T>();
  at::parallel_for(0, T_ * rows_per_token, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / rows_per_token, head = r % rows_per_token;
      const T* x = xp + r * D;
      if (head >= heads + kv_heads) {  // a v head: stored as it is
        std::memcpy(vc + ((head - heads - kv_heads) * S + slot[t]) * D, x, D * sizeof(T));
        continue;
      }
      // transformers: x * cos + rotate_half(x) * sin, each product and the sum rounded to T.
      T* o = out + (t * (heads + kv_heads) + head) * D;
      const T* c = cp + t * D;
      const T* s = sp + t * D;
      for (int64_t i = 0; i < half; i += 16) {
        const __m512 x1 = load16(x + i), x2 = load16(x + half + i);
        const __m512 a1 = round_to(_mm512_mul_ps(x1, load16(c + i)), x);
        const __m512 b1 = round_to(_mm512_mul_ps(x2, load16(s + i)), x);
        store16(o + i, _mm512_sub_ps(a1, b1));
        const __m512 a2 = round_to(_mm512_mul_ps(x2, load16(c + half + i)), x);
        const __m512 b2 = round_to(_mm512_mul_ps(x1, load16(s + half + i)), x);
        store16(o + half + i, _mm512_add_ps(a2, b2));
      }
      if (head >= heads)
        std::memcpy(kc + ((head - heads) * S + slot[t]) * D, o, D * sizeof(T));
    }
  });
}

at::Tensor rope_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& slots, at::Tensor& k_cache, at::Tensor& v_cache,
                         int64_t heads, int64_t kv_heads) {
  // qkv: [T, (heads + 2 kv_heads) * D]; cos, sin: [T, D]; slots: [T] int64; caches [KVH, S, D].
  // -> [T, heads + kv_heads, D]: the rotated q and k heads.
  const int64_t D = cos.size(1);
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && D % 32 == 0,
              "rope_write_kv: contiguous inputs, head dim a multiple of 32");
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * D && cos.size(0) == qkv.size(0) && sin.sizes() == cos.sizes(),
              "rope_write_kv: shapes do not match");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(0) == kv_heads && k_cache.size(2) == D,
              "rope_write_kv: caches must be contiguous [kv_heads, slots, D]");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && k_cache.scalar_type() == qkv.scalar_type() &&
              v_cache.scalar_type() == qkv.scalar_type(), "rope_write_kv: one dtype for all");
  const auto sl = slots.contiguous();
  TORCH_CHECK(sl.scalar_type() == at::kLong && sl.numel() == qkv.size(0), "rope_write_kv: one int64 slot per token");
  auto qk = at::empty({qkv.size(0), heads + kv_heads, D}, qkv.options());
  if (qkv.scalar_type() == at::kBFloat16) rope_write_kv_impl<bf16>(qkv, cos, sin, sl, k_cache, v_cache, heads, kv_heads, qk);
  else if (qkv.scalar_type() == at::kFloat) rope_write_kv_impl<float>(qkv, cos, sin, sl, k_cache, v_cache, heads, kv_heads, qk);
  else TORCH_CHECK(false, "rope_write_kv: float32 or bfloat16 only");
  return qk;
}

// ---- greedy: the first index of each row's maximum, as torch.argmax ----

template <typename T>
void argmax_rows_impl(const T* x, int64_t* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * n;
      __m512 best = _mm512_set1_ps(-INFINITY);
      __m512i best_i = _mm512_set1_epi32(-1);
      __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512i step = _mm512_set1_epi32(16);
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {  // per lane, the first index of that lane's maximum
        const __m512 v = load16(row + i);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, gt, v);
        best_i = _mm512_mask_mov_epi32(best_i, gt, idx);
        idx = _mm512_add_epi32(idx, step);
      }
      alignas(64) float bv[16];
      alignas(64) int32_t bi[16];
      _mm512_store_ps(bv, best);
      _mm512_store_epi32(bi, best_i);
      float m = -INFINITY;
      int64_t arg = -1;
      for (int l = 0; l < 16; ++l)
        if (bi[l] >= 0 && (bv[l] > m || (bv[l] == m && bi[l] < arg))) m = bv[l], arg = bi[l];
      for (; i < n; ++i) {
        const float v = static_cast<float>(row[i]);
        if (v > m) m = v, arg = i;
      }
      out[r] = arg < 0 ? 0 : arg;  // a row of -inf only (or NaN): torch gives 0 for all -inf
    }
  });
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "argmax_rows: [N, V] with contiguous rows");
  const auto xc = x.contiguous();
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  if (x.scalar_type() == at::kBFloat16) argmax_rows_impl<bf16>(xc.data_ptr<bf16>(), out.data_ptr<int64_t>(), x.size(0), x.size(1));
  else if (x.scalar_type() == at::kFloat) argmax_rows_impl<float>(xc.data_ptr<float>(), out.data_ptr<int64_t>(), x.size(0), x.size(1));
  else TORCH_CHECK(false, "argmax_rows: float32 or bfloat16 only");
  return out;
}

}  // namespace

TORCH_LIBRARY(sagellm, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "Tensor context_lens, int block_size, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) h, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("rope_write_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor slots, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "int heads, int kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(sagellm, CPU, m) {
  m.impl("paged_decode_attention", paged_decode_attention);
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("silu_mul", silu_mul);
  m.impl("argmax_rows", argmax_rows);
  m.impl("rope_write_kv", rope_write_kv);
}
