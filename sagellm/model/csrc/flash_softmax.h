// The online softmax of sagellm's flash prefill attention (prefill_attention.cpp): exp as 2^x on a
// degree-4 polynomial, each row's running maximum with its lazy rescale, and the probabilities'
// rounding to bfloat16 with their sums. AVX512-BF16; only prefill_attention.cpp includes it.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "simd.h"

#define SAGELLM_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace sagellm::flash {

constexpr float LOG2E = 1.44269504088896341f;
// How far (in log2 units) a row's scores may rise above its running maximum before the maximum
// is moved and the row's output and sum rescaled: probabilities stay below 2^LAZY, far inside
// float32 and bfloat16's range, and most tiles after the first need no reduction at all.
constexpr float LAZY = 8.f;
constexpr float MASKED = -1e30f;  // a masked score: e^(MASKED - m) is 0 without NaN

// 2^t for t <= ~LAZY + 1: 2^n * p(f), n = round(t), f = t - n in [-1/2, 1/2], p the degree-4
// Taylor polynomial of 2^f (relative error < 5e-5, against bfloat16's 2e-3 half step: the
// probabilities are rounded to bfloat16 next). MASKED scores give 0.
SAGELLM_BF16_TARGET inline __m512 exp2_bf16(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(9.618129107628477e-3f);  // ln2^4 / 4!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));  // ln2^3 / 3!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-1f));  // ln2^2 / 2!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-1f));  // ln2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// A (kv head, query block)'s softmax state, per row: the running maximum m of score * c (c =
// scale * log2 e), lim = (m + LAZY) / c in raw score units, 16 partial sums of the bf16
// probabilities, and the unnormalised output [dim].
struct Rows {
  float* m;
  float* lim;
  float* l;  // [rows][16]
  float* o;  // [rows][dim]
  int64_t dim;
};

// Row r's maximum moves to its tile's maximum (> lim): its output and sums scale by 2^(m - m_new).
SAGELLM_BF16_TARGET inline void raise_max(Rows& st, int64_t r, __m512 mx, float c) {
  const float m_new = _mm512_reduce_max_ps(mx) * c;
  const float alpha = st.m[r] == -INFINITY ? 0.f : std::exp2(st.m[r] - m_new);
  const __m512 av = _mm512_set1_ps(alpha);
  float* o = st.o + r * st.dim;
  for (int64_t d = 0; d < st.dim; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), av));
  _mm512_storeu_ps(st.l + 16 * r, _mm512_mul_ps(_mm512_loadu_ps(st.l + 16 * r), av));
  st.m[r] = m_new;
  st.lim[r] = (m_new + LAZY) / c;
}

// One row's 64 probabilities e [4][16] rounded to bf16 into p [64] (one VCVTNE2PS2BF16 per 32),
// and added to the row's 16 partial sums l as rounded: the values p.v multiplies.
SAGELLM_BF16_TARGET inline void store_probs(const __m512* e, bf16* p, float* l) {
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);  // bf16 1.0
  const __m512bh lo = _mm512_cvtne2ps_pbh(e[1], e[0]);  // keys 0-15 in the low half
  const __m512bh hi = _mm512_cvtne2ps_pbh(e[3], e[2]);
  _mm512_storeu_si512(p, (__m512i)lo);
  _mm512_storeu_si512(p + 32, (__m512i)hi);
  _mm512_storeu_ps(l, _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_loadu_ps(l), lo, ones), hi, ones));
}

}  // namespace sagellm::flash
