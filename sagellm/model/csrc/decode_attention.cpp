// Decode attention over the paged KV cache for sagellm's CPU path (see cpu_kernels.cpp): one
// query token per sequence against its context, read in place from the cache blocks. A sliding
// window reads only the last `window` tokens; logit softcapping and attention sinks (one extra
// logit per head, dropped after the softmax) are applied as transformers applies them.

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

// Prefetches one cache block's rows (block_size x D elements, contiguous) into L1 (T0) or L2 (T1).
template <int Hint, typename T>
inline void prefetch_rows(const T* p, int64_t elements) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < elements * static_cast<int64_t>(sizeof(T)); off += 64)
    _mm_prefetch(c + off, static_cast<_mm_hint>(Hint));
}

struct Features {
  int64_t window;  // keys t with L - 1 - t < window are seen; 0: all of them
  float softcap;   // scores <- tanh(scores / softcap) * softcap; 0: none
  const float* sinks;  // [H] one extra logit per query head, or nullptr
};

// G query heads share one KV head; the head dim is NC * 16. One work item is one (sequence, KV
// head): its G scaled queries stay in registers while the context's keys stream past (two tokens
// at a time, so the FMA chains overlap), then the probabilities weight the values.
template <typename T, int G, int NC>
void decode_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                      const at::Tensor& table, const at::Tensor& lens, int64_t bs, float scale,
                      const Features& f, at::Tensor& out) {
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
    // The first key each sequence sees: the window is a loop bound.
    auto first = [&](int64_t len) { return f.window > 0 && len > f.window ? len - f.window : int64_t{0}; };
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / KVH, h = w % KVH, L = lp[b], t0 = first(L), n = L - t0;
      const int64_t* blocks = tp + b * NB;
      const T* kh = kp + h * S * D;
      const T* vh = vp + h * S * D;
      auto row = [&](const T* base, int64_t t) { return base + (blocks[t / bs] * bs + t % bs) * D; };
      // The context is scattered over blocks, which the hardware prefetcher cannot follow: fetch
      // the next item's first keys, each next block of keys, and the values for the second pass
      // ahead of use (measured over 30 layers' caches, beyond L3: 25-40 % faster).
      if (w + 1 < end) {
        const int64_t b1 = (w + 1) / KVH, h1 = (w + 1) % KVH;
        prefetch_rows<_MM_HINT_T1>(kp + h1 * S * D + tp[b1 * NB + first(lp[b1]) / bs] * bs * D, bs * D);
      }
      if (t0 % bs != 0) {  // a window starting inside a block: the loop below prefetches from the next one
        if ((t0 / bs + 1) * bs < L) prefetch_rows<_MM_HINT_T0>(kh + blocks[t0 / bs + 1] * bs * D, bs * D);
        prefetch_rows<_MM_HINT_T1>(vh + blocks[t0 / bs] * bs * D, bs * D);
      }
      scores.resize(G * n);
      float* sc = scores.data();
      __m512 qv[G][NC];
      const __m512 sv = _mm512_set1_ps(scale);
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < NC; ++c)
          qv[g][c] = _mm512_mul_ps(load16(qp + b * qs0 + (h * G + g) * qs1 + 16 * c), sv);
      int64_t t = t0;
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
          sc[g * n + t - t0] = _mm512_reduce_add_ps(a0[g]);
          sc[g * n + t + 1 - t0] = _mm512_reduce_add_ps(a1[g]);
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
        for (int g = 0; g < G; ++g) sc[g * n + t - t0] = _mm512_reduce_add_ps(a0[g]);
      }
      for (int g = 0; g < G; ++g) {
        if (f.softcap > 0) softcap_inplace(sc + g * n, n, f.softcap);
        softmax_inplace(sc + g * n, n, f.sinks ? f.sinks[h * G + g] : -INFINITY);
      }
      __m512 acc[G][NC];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_setzero_ps();
      for (t = t0; t < L; ++t) {
        if (t % bs == 0 && t + bs < L) prefetch_rows<_MM_HINT_T0>(vh + blocks[t / bs + 1] * bs * D, bs * D);
        const T* v0 = row(vh, t);
        for (int c = 0; c < NC; ++c) {
          const __m512 x = load16(v0 + 16 * c);
          for (int g = 0; g < G; ++g) acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(sc[g * n + t - t0]), x, acc[g][c]);
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
                        const Features& f, at::Tensor& out) {
  switch (G) {
    case 1: return decode_attention<T, 1, NC>(q, kc, vc, table, lens, bs, scale, f, out);
    case 2: return decode_attention<T, 2, NC>(q, kc, vc, table, lens, bs, scale, f, out);
    case 3: return decode_attention<T, 3, NC>(q, kc, vc, table, lens, bs, scale, f, out);
    case 4: return decode_attention<T, 4, NC>(q, kc, vc, table, lens, bs, scale, f, out);
    case 5: return decode_attention<T, 5, NC>(q, kc, vc, table, lens, bs, scale, f, out);
    case 6: return decode_attention<T, 6, NC>(q, kc, vc, table, lens, bs, scale, f, out);
    case 7: return decode_attention<T, 7, NC>(q, kc, vc, table, lens, bs, scale, f, out);
    case 8: return decode_attention<T, 8, NC>(q, kc, vc, table, lens, bs, scale, f, out);
  }
  TORCH_CHECK(false, "paged_decode_attention: ", G, " query heads per KV head (1 to 8 supported)");
}

template <typename T>
void decode_attention_dispatch(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                               const at::Tensor& table, const at::Tensor& lens, int64_t bs, float scale,
                               const Features& f, at::Tensor& out) {
  const int64_t G = q.size(1) / kc.size(0);
  switch (q.size(2)) {
    case 64: return decode_attention_g<T, 4>(G, q, kc, vc, table, lens, bs, scale, f, out);
    case 128: return decode_attention_g<T, 8>(G, q, kc, vc, table, lens, bs, scale, f, out);
  }
  TORCH_CHECK(false, "paged_decode_attention: head dim ", q.size(2), " (64 or 128 supported)");
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_table, const at::Tensor& context_lens,
                                  int64_t block_size, double scale, int64_t window, double softcap,
                                  const std::optional<at::Tensor>& sinks) {
  // q: [B, H, D] (rows may be strided, the head dim contiguous); k_cache, v_cache: [KVH, slots, D]
  // contiguous; block_table: [B, NB] int64; context_lens: [B] int64, each >= 1; window: 0 or the
  // sliding window; softcap: 0 or the cap; sinks: [H] or None -> [B, H, D].
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [B, H, D] with a contiguous last dim");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the KV cache must share a dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(0) == 0, "query heads must be a multiple of KV heads");
  const auto table = block_table.contiguous();
  const auto lens = context_lens.contiguous();
  TORCH_CHECK(table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(window >= 0 && softcap >= 0, "paged_decode_attention: window and softcap must be >= 0");
  at::Tensor sink;
  if (sinks.has_value()) {
    sink = sinks->to(at::kFloat).contiguous();
    TORCH_CHECK(sink.dim() == 1 && sink.size(0) == q.size(1), "paged_decode_attention: one sink per query head");
  }
  const Features f{window, static_cast<float>(softcap), sinks.has_value() ? sink.data_ptr<float>() : nullptr};
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const float s = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16) decode_attention_dispatch<bf16>(q, k_cache, v_cache, table, lens, block_size, s, f, out);
  else if (q.scalar_type() == at::kFloat) decode_attention_dispatch<float>(q, k_cache, v_cache, table, lens, block_size, s, f, out);
  else TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 only");
  return out;
}
}  // namespace

TORCH_LIBRARY_IMPL(sagellm, CPU, m) { m.impl("paged_decode_attention", paged_decode_attention); }
