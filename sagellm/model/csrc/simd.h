// Shared by sagellm's CPU kernels: 16-lane float32 loads and stores of float32 or bfloat16
// data, rounding to a dtype, vectorised exp and tanh, attention logit softcapping and a softmax
// (with an optional attention sink). AVX-512 (x86-64-v4).
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace sagellm {

using bf16 = c10::BFloat16;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// x rounded to T's precision (to nearest even; NaN stays a quiet NaN, as c10::BFloat16 does),
// kept in float32.
inline __m512 round_to(__m512 x, const float*) { return x; }
inline __m512 round_to(__m512 x, const bf16*) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
  return _mm512_castsi512_ps(r);
}
inline void store16(bf16* p, __m512 v) {
  const __m512i top = _mm512_srli_epi32(_mm512_castps_si512(round_to(v, p)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(top));
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

// tanh(x), to a few float32 roundings: sign(x) * -u / (2 + u) with u = e^(-2|x|) - 1, where u
// comes from its Taylor series near 0 (so small |x| keep their relative precision) and from exp16
// elsewhere; no overflow for any x.
inline __m512 tanh16(__m512 x) {
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(-2.f));  // <= 0
  // e^z - 1 = z + z^2 (1/2 + z (1/6 + ...)), to z^9: below 1e-9 relative error for |z| < 0.35.
  __m512 p = _mm512_set1_ps(1.f / 362880);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.f / 40320));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.f / 5040));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(0.5f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(z, z), p, z);
  const __m512 big = _mm512_sub_ps(exp16(z), _mm512_set1_ps(1.f));
  const __m512 u = _mm512_mask_mov_ps(big, _mm512_cmp_ps_mask(z, _mm512_set1_ps(-0.35f), _CMP_GT_OQ), small);
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_setzero_ps(), u), _mm512_add_ps(_mm512_set1_ps(2.f), u));
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x80000000u)));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
}

// In place: s[0 .. n) <- tanh(s / cap) * cap, attention logit softcapping (Gemma 2) as
// transformers computes it: a division, the tanh, a multiplication.
inline void softcap_inplace(float* s, int64_t n, float cap) {
  const __m512 c = _mm512_set1_ps(cap);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(s + i, _mm512_mul_ps(tanh16(_mm512_div_ps(_mm512_loadu_ps(s + i), c)), c));
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(s + i, k, _mm512_mul_ps(tanh16(_mm512_div_ps(_mm512_maskz_loadu_ps(k, s + i), c)), c));
  }
}

// In place: s[0 .. n) <- softmax(s), n >= 1. A finite `sink` (an attention sink, gpt-oss) is one
// more logit in the softmax whose probability is dropped: the rest then sum to less than 1.
inline void softmax_inplace(float* s, int64_t n, float sink = -INFINITY) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + i));
  float m = std::max(_mm512_reduce_max_ps(mx), sink);  // a maximum is exact in any order
  for (; i < n; ++i) m = std::max(m, s[i]);
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  if (sink != -INFINITY)  // lane 0 only: e^(sink - m), from the same exp as the scores'
    sum = _mm512_maskz_mov_ps(1, exp16(_mm512_set1_ps(sink - m)));
  i = 0;
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

}  // namespace sagellm
