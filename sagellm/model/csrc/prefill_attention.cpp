// Causal prefill attention in bfloat16 for CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel
// Cooper Lake / Sapphire Rapids and later), built and loaded by sagellm/model/cpu_kernels.py.
//
// Why our own: on this project's 2-core Zen 4 machines the blocked prefill attention (two oneDNN
// bmm calls and causal_softmax per 64-query block) ran a 2,000-token prompt's 30 layers at
// ~22-26 ms a layer, 140-200 GFLOP/s, against ~430 GFLOP/s for the linear layers: the q.k^T
// product has an inner dimension of only head_dim, its bf16 scores go through memory three times
// and torch allocates every block's tensors (docs/performance.md, "Prefill"). Here each
// (kv head, 32-query block) keeps its scores in a 64-key tile, softmaxes online (flash
// attention's running maximum and sum), and both products run on VDPBF16PS with fp32
// accumulators over K and V packed once per call in the pairs that instruction reads.
//
// Arithmetic: q.k in fp32 from bf16 inputs, scaled, softmax in fp32, the probabilities rounded
// to bf16 for the p.v product (as the blocked path rounds them), the output divided by the
// running sum in fp32 and rounded once to bf16. Not bitwise the blocked path's; BATCH_INVARIANT
// keeps that path.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "simd.h"

#define SAGELLM_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

using namespace sagellm;

constexpr int64_t KEY_BLOCK = 64;  // keys per tile: 4 vectors of 16
#ifndef SAGELLM_FLASH_QB
#define SAGELLM_FLASH_QB 32
#endif
constexpr int64_t QUERY_BLOCK = SAGELLM_FLASH_QB;  // queries per work item (times the group's heads: its rows)

inline int32_t pair_at(const bf16* p) {  // two adjacent bf16 as one 32-bit lane
  int32_t x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

// K of one kv head for the q.k product: [key block][d pair][64 keys][2], zero past `keys`.
// V for the p.v product: [key pair][d][2]. `row(j)` points at key j's head_dim values.
template <typename KRow, typename VRow>
void pack_kv(KRow k_row, VRow v_row, int64_t keys, int64_t padded, int64_t dim, bf16* kp, bf16* vp) {
  const int64_t pairs = dim / 2;
  auto* k32 = reinterpret_cast<int32_t*>(kp);
  for (int64_t j = 0; j < padded; ++j) {
    const int64_t block = j / KEY_BLOCK, lane = j % KEY_BLOCK;
    int32_t* out = k32 + block * pairs * KEY_BLOCK + lane;
    if (j < keys) {
      const bf16* src = k_row(j);
      for (int64_t p = 0; p < pairs; ++p) out[p * KEY_BLOCK] = pair_at(src + 2 * p);
    } else {
      for (int64_t p = 0; p < pairs; ++p) out[p * KEY_BLOCK] = 0;
    }
  }
  for (int64_t j = 0; j < padded; j += 2) {
    bf16* out = vp + j * dim;  // key pair j / 2: dim * 2 values
    const bf16* a = j < keys ? v_row(j) : nullptr;
    const bf16* b = j + 1 < keys ? v_row(j + 1) : nullptr;
    for (int64_t d = 0; d < dim; ++d) {
      out[2 * d] = a ? a[d] : bf16(0.f);
      out[2 * d + 1] = b ? b[d] : bf16(0.f);
    }
  }
}

// acc[r][c] = q_r . k_(16c + lane) for R rows and one 64-key block; scores [R][64] scaled.
template <int R>
SAGELLM_BF16_TARGET void qk_tile(const bf16* const* q, const bf16* kb, int64_t pairs, float scale, float* s) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const bf16* kp = kb + p * KEY_BLOCK * 2;
    __m512bh kv[4];
    for (int c = 0; c < 4; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(kp + 32 * c);
    for (int r = 0; r < R; ++r) {
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(pair_at(q[r] + 2 * p));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qv, kv[c]);
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * KEY_BLOCK + 16 * c, _mm512_mul_ps(acc[r][c], sv));
}

// o[r][d0 .. d0 + 64) += p_r . v for R rows over one 64-key block (32 key pairs).
template <int R>
SAGELLM_BF16_TARGET void pv_tile(const bf16* p, const bf16* vb, int64_t dim, int64_t d0, float* o) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_loadu_ps(o + r * dim + d0 + 16 * c);
  for (int64_t kp = 0; kp < KEY_BLOCK / 2; ++kp) {
    const bf16* vrow = vb + kp * dim * 2 + d0 * 2;
    __m512bh vv[4];
    for (int c = 0; c < 4; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vrow + 32 * c);
    for (int r = 0; r < R; ++r) {
      const __m512bh pv = (__m512bh)_mm512_set1_epi32(pair_at(p + r * KEY_BLOCK + 2 * kp));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pv, vv[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + r * dim + d0 + 16 * c, acc[r][c]);
}

SAGELLM_BF16_TARGET void qk_block(const bf16* const* q, int64_t rows, const bf16* kb, int64_t pairs, float scale,
                                  float* s) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) qk_tile<4>(q + r, kb, pairs, scale, s + r * KEY_BLOCK);
  switch (rows - r) {
    case 3: qk_tile<3>(q + r, kb, pairs, scale, s + r * KEY_BLOCK); break;
    case 2: qk_tile<2>(q + r, kb, pairs, scale, s + r * KEY_BLOCK); break;
    case 1: qk_tile<1>(q + r, kb, pairs, scale, s + r * KEY_BLOCK); break;
    default: break;
  }
}

SAGELLM_BF16_TARGET void pv_block(const bf16* p, int64_t rows, const bf16* vb, int64_t dim, float* o) {
  for (int64_t d0 = 0; d0 < dim; d0 += 64) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) pv_tile<4>(p + r * KEY_BLOCK, vb, dim, d0, o + r * dim);
    switch (rows - r) {
      case 3: pv_tile<3>(p + r * KEY_BLOCK, vb, dim, d0, o + r * dim); break;
      case 2: pv_tile<2>(p + r * KEY_BLOCK, vb, dim, d0, o + r * dim); break;
      case 1: pv_tile<1>(p + r * KEY_BLOCK, vb, dim, d0, o + r * dim); break;
      default: break;
    }
  }
}

// One row's online softmax step over a 64-key tile of which the first `vis` keys are visible:
// p (bf16, 0 past vis) = e^(s - m_new), l = l e^(m - m_new) + sum p, o *= e^(m - m_new).
SAGELLM_BF16_TARGET void softmax_tile(const float* s, int64_t vis, float& m, float& l, bf16* p, float* o,
                                      int64_t dim) {
  __m512 sv[4];
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int c = 0; c < 4; ++c) {
    const int64_t left = vis - 16 * c;
    const __mmask16 k = left >= 16 ? 0xffff : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
    sv[c] = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, s + 16 * c);
    mx = _mm512_max_ps(mx, sv[c]);
  }
  const float m_new = std::max(m, _mm512_reduce_max_ps(mx));
  const __m512 mv = _mm512_set1_ps(m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < 4; ++c) {
    const int64_t left = vis - 16 * c;
    const __mmask16 k = left >= 16 ? 0xffff : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
    const __m512 e = round_to(_mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(sv[c], mv))), p);
    sum = _mm512_add_ps(sum, e);
    store16(p + 16 * c, e);
  }
  if (m_new != m) {
    const float alpha = m == -INFINITY ? 0.f : std::exp(m - m_new);
    const __m512 av = _mm512_set1_ps(alpha);
    for (int64_t d = 0; d < dim; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), av));
    l *= alpha;
    m = m_new;
  }
  l += _mm512_reduce_add_ps(sum);
}

struct Shape {
  int64_t t, ctx, heads, kv_heads, group, dim;
  int64_t q_tok, q_head;  // q strides
};

// One (kv head, query block): its rows are (query i, head g of the group), i major.
SAGELLM_BF16_TARGET void attend_block(const Shape& sh, const bf16* q, const bf16* kp, const bf16* vp, int64_t kvh,
                                      int64_t q0, float scale, bf16* out, std::vector<float>& s,
                                      std::vector<bf16>& p, std::vector<float>& o, std::vector<float>& m,
                                      std::vector<float>& l, std::vector<const bf16*>& qrows) {
  const int64_t nq = std::min(QUERY_BLOCK, sh.t - q0), rows = nq * sh.group, dim = sh.dim;
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t g = 0; g < sh.group; ++g)
      qrows[i * sh.group + g] = q + (q0 + i) * sh.q_tok + (kvh * sh.group + g) * sh.q_head;
  std::fill(o.begin(), o.begin() + rows * dim, 0.f);
  std::fill(m.begin(), m.begin() + rows, -INFINITY);
  std::fill(l.begin(), l.begin() + rows, 0.f);
  const int64_t first = sh.ctx + q0;  // the block's first query sees keys 0 .. first
  const int64_t blocks = (first + nq - 1) / KEY_BLOCK + 1;
  for (int64_t b = 0; b < blocks; ++b) {
    qk_block(qrows.data(), rows, kp + b * KEY_BLOCK * dim, dim / 2, scale, s.data());
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t vis = std::min<int64_t>(KEY_BLOCK, first + r / sh.group + 1 - b * KEY_BLOCK);
      bf16* pr = p.data() + r * KEY_BLOCK;
      if (vis <= 0) {
        std::memset(static_cast<void*>(pr), 0, KEY_BLOCK * sizeof(bf16));
        continue;
      }
      softmax_tile(s.data() + r * KEY_BLOCK, vis, m[r], l[r], pr, o.data() + r * dim, dim);
    }
    pv_block(p.data(), rows, vp + b * KEY_BLOCK * dim, dim, o.data());
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r / sh.group, g = r % sh.group;
    bf16* dst = out + ((q0 + i) * sh.heads + kvh * sh.group + g) * dim;
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    for (int64_t d = 0; d < dim; d += 16) store16(dst + d, _mm512_mul_ps(_mm512_loadu_ps(o.data() + r * dim + d), inv));
  }
}

// q: [t, H, D]; k, v: [KVH, N, D], key j of the sequence at row slots[j] (or j without slots),
// ctx_len + t keys; -> [t, H, D]. Query i (position ctx_len + i) sees keys 0 .. ctx_len + i.
at::Tensor flash_prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ctx_len,
                                   double scale, const std::optional<at::Tensor>& slots) {
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "flash_prefill_attention: the CPU lacks AVX512-BF16");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "flash_prefill_attention: bfloat16 only");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "flash_prefill_attention: q [t, H, D], k and v [KVH, N, D], rows of D contiguous");
  Shape sh{q.size(0), ctx_len, q.size(1), k.size(0), 0, q.size(2), q.stride(0), q.stride(1)};
  TORCH_CHECK(sh.dim % 64 == 0 && k.size(2) == sh.dim && v.size(2) == sh.dim && v.size(0) == sh.kv_heads &&
              sh.heads % sh.kv_heads == 0, "flash_prefill_attention: head dim a multiple of 64, whole groups");
  sh.group = sh.heads / sh.kv_heads;
  const int64_t keys = ctx_len + sh.t;
  at::Tensor sl;
  const int64_t* sp = nullptr;
  if (slots.has_value()) {
    sl = slots->to(at::kLong).contiguous();
    TORCH_CHECK(sl.numel() == keys, "flash_prefill_attention: one slot per key");
    sp = sl.data_ptr<int64_t>();
  } else {
    TORCH_CHECK(k.size(1) == keys && v.size(1) == keys, "flash_prefill_attention: ctx_len + t keys");
  }
  const int64_t padded = (keys + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK, dim = sh.dim;
  auto packed = at::empty({2, sh.kv_heads, padded * dim}, q.options());
  bf16* kp = packed[0].data_ptr<bf16>();
  bf16* vp = packed[1].data_ptr<bf16>();
  const bf16* kd = k.data_ptr<bf16>();
  const bf16* vd = v.data_ptr<bf16>();
  at::parallel_for(0, sh.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      const bf16* kh = kd + h * k.stride(0);
      const bf16* vh = vd + h * v.stride(0);
      const int64_t ks = k.stride(1), vs = v.stride(1);
      pack_kv([&](int64_t j) { return kh + (sp ? sp[j] : j) * ks; }, [&](int64_t j) { return vh + (sp ? sp[j] : j) * vs; },
              keys, padded, dim, kp + h * padded * dim, vp + h * padded * dim);
    }
  });
  auto out = at::empty({sh.t, sh.heads, dim}, q.options());
  const bf16* qd = q.data_ptr<bf16>();
  bf16* od = out.data_ptr<bf16>();
  const int64_t qblocks = (sh.t + QUERY_BLOCK - 1) / QUERY_BLOCK, items = qblocks * sh.kv_heads;
  const float s = static_cast<float>(scale);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = QUERY_BLOCK * sh.group;
    std::vector<float> sbuf(rows * KEY_BLOCK), obuf(rows * dim), m(rows), l(rows);
    std::vector<bf16> pbuf(rows * KEY_BLOCK);
    std::vector<const bf16*> qrows(rows);
    for (int64_t it = begin; it < end; ++it) {
      // Later query blocks see more keys: taken first, last, second, second to last, ... so the
      // threads' contiguous ranges of items hold about the same work.
      const int64_t j = it / sh.kv_heads, kvh = it % sh.kv_heads;
      const int64_t qb = j % 2 == 0 ? j / 2 : qblocks - 1 - j / 2;
      attend_block(sh, qd, kp + kvh * padded * dim, vp + kvh * padded * dim, kvh, qb * QUERY_BLOCK, s, od, sbuf, pbuf,
                   obuf, m, l, qrows);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sagellm, m) {
  m.def("flash_prefill_attention(Tensor q, Tensor k, Tensor v, int ctx_len, float scale, Tensor? slots=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(sagellm, CPU, m) { m.impl("flash_prefill_attention", flash_prefill_attention); }
