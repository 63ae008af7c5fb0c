// Fused CPU kernels for the decode step (AVX-512, float32 and bfloat16), built and loaded by
// sagellm/model/cpu_kernels.py. Each replaces a run of small torch operators whose per-call cost
// dominated a batched decode step on this project's 2-core machines (docs/performance.md):
//   paged_decode_attention  (decode_attention.cpp) one query token per sequence over its paged
//                           K/V, read in place (the torch path gathers every context first);
//   rms_norm, add_rms_norm  transformers' LlamaRMSNorm, optionally after the residual add;
//   silu_mul                SwiGLU's silu(gate) * up on the fused gate/up projection;
//   argmax_rows             greedy picks straight off bf16 logits (torch first converts them);
//   rope_write_kv           rotary embedding of the q and k heads, and the new k and v stored in
//                           the paged cache, straight from the fused q/k/v projection;
//   causal_softmax          a prefill block's scores scaled, causally masked (and windowed,
//                           softcapped, with sinks where the model has them) and softmaxed in
//                           one pass, in the scores' dtype (torch: five passes, three in float32).
// Arithmetic follows the torch operators it replaces: float32 inside, results rounded to the
// tensor's dtype where torch rounds them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "simd.h"

namespace {

using namespace sagellm;

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
      for (int64_t i = 0; i < n; i += 16) {  // normalised and rounded (.to(input dtype)), then scaled
        store16(yr + i, _mm512_mul_ps(round_to(_mm512_mul_ps(load16(hr + i), inv), yr), load16(w + i)));
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
        const __m512 silu = round_to(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e)), yr);
        store16(yr + i, _mm512_mul_ps(silu, load16(u + i)));
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

// ---- prefill: scale, causal mask and softmax of one block of queries' scores ----

// scores: [rows, keys], rows ordered (kv head, query head in group, query i), so row r belongs to
// query head r / n; query i of the block sees keys lo .. first_masked + i, where lo is 0 or, with a
// sliding window, first_masked + i + 1 - window. Softcapped if softcap > 0, softmaxed in float32
// with the head's sink as one more logit if there are sinks, the probabilities rounded to the
// scores' dtype, the keys it cannot see 0.
template <typename T>
void causal_softmax_impl(const T* sc, T* out, int64_t rows, int64_t keys, int64_t n, int64_t first_masked,
                         float scale, int64_t window, float softcap, const float* sinks) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(keys);
    const __m512 sv = _mm512_set1_ps(scale);
    for (int64_t r = begin; r < end; ++r) {
      T* o = out + r * keys;
      const int64_t hi = std::min<int64_t>(keys, first_masked + r % n + 1);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, hi - window) : 0;
      const int64_t vis = hi - lo;
      const T* x = sc + r * keys + lo;
      float* f = buf.data();
      int64_t i = 0;
      for (; i + 16 <= vis; i += 16) _mm512_storeu_ps(f + i, _mm512_mul_ps(load16(x + i), sv));
      for (; i < vis; ++i) f[i] = static_cast<float>(x[i]) * scale;
      if (softcap > 0) softcap_inplace(f, vis, softcap);
      softmax_inplace(f, vis, sinks ? sinks[r / n] : -INFINITY);
      for (i = 0; i < lo; ++i) o[i] = static_cast<T>(0.f);
      T* ov = o + lo;
      for (i = 0; i + 16 <= vis; i += 16) store16(ov + i, _mm512_loadu_ps(f + i));
      for (; i < vis; ++i) ov[i] = static_cast<T>(f[i]);
      for (i = hi; i < keys; ++i) o[i] = static_cast<T>(0.f);
    }
  });
}

at::Tensor causal_softmax(const at::Tensor& scores, double scale, int64_t n, int64_t first_masked, int64_t window,
                          double softcap, const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(scores.is_contiguous() && scores.size(-2) % n == 0, "causal_softmax: contiguous [..., rows, keys]");
  TORCH_CHECK(window >= 0 && softcap >= 0, "causal_softmax: window and softcap must be >= 0");
  auto out = at::empty_like(scores);
  const int64_t keys = scores.size(-1), rows = scores.numel() / keys;
  at::Tensor sink;
  if (sinks.has_value()) {
    sink = sinks->to(at::kFloat).contiguous();
    TORCH_CHECK(sink.dim() == 1 && sink.size(0) * n == rows, "causal_softmax: one sink per query head");
  }
  const float* sp = sinks.has_value() ? sink.data_ptr<float>() : nullptr;
  const float s = static_cast<float>(scale), cap = static_cast<float>(softcap);
  if (scores.scalar_type() == at::kBFloat16) causal_softmax_impl<bf16>(scores.data_ptr<bf16>(), out.data_ptr<bf16>(), rows, keys, n, first_masked, s, window, cap, sp);
  else if (scores.scalar_type() == at::kFloat) causal_softmax_impl<float>(scores.data_ptr<float>(), out.data_ptr<float>(), rows, keys, n, first_masked, s, window, cap, sp);
  else TORCH_CHECK(false, "causal_softmax: float32 or bfloat16 only");
  return out;
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
        "Tensor context_lens, int block_size, float scale, int window=0, float softcap=0., Tensor? sinks=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) h, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("causal_softmax(Tensor scores, float scale, int n, int first_masked, int window=0, float softcap=0., "
        "Tensor? sinks=None) -> Tensor");
  m.def("rope_write_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor slots, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "int heads, int kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(sagellm, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("silu_mul", silu_mul);
  m.impl("argmax_rows", argmax_rows);
  m.impl("causal_softmax", causal_softmax);
  m.impl("rope_write_kv", rope_write_kv);
}
