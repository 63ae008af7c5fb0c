// The sampler's per-row work for a whole batch in one call, AVX-512 (sagellm/engine/sampler.py
// prepares the arguments and owns the semantics; sagellm/engine/sampler_torch.py does the same in
// torch operators for other devices and is the reference in the tests). Per row:
//   repetition (prompt + output), frequency and presence (output) penalties, logit bias, the EOS
//   ban -> the log-normaliser, the chosen token's logprob and the top_n alternatives (before the
//   grammar and the warpers) -> the grammar's bitmask -> argmax (greedy), or temperature, top_k,
//   top_p, min_p, typical_p (transformers' order) and an exponential race: the token is
//   argmax_i w_i / E_i over the tokens kept, w_i = exp((l_i - max) / T) and E_i ~ Exp(1) from a
//   counter-based hash of (seed, token index, token id): a seeded row draws the same tokens in
//   any batch, and a draw costs no sort.
// Why C++: in torch operators a batch-64 step of temperature + top_p costs 7-10 ms before any
// random number is drawn (float32 copy, logsumexp, a top-k), against ~0.3 ms for the greedy
// argmax (docs/performance.md). Here a row is read four or five times and only its candidates (the
// tokens within a few nats of the best, checked to hold all that the filters keep) are ordered
// (sampler_draw.h).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "sampler_draw.h"

namespace {

using namespace sagellm;
using namespace sagellm::sampling;

inline __m512 load_masked(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load_masked(const bf16* p, __mmask16 k) {
  const __m256i raw = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// The first index of the maximum (torch.argmax), -1 when nothing is above -inf or a value is NaN.
inline int64_t argmax_of(const float* x, int64_t n) {
  bool nan;
  const float m = max_of(x, n, &nan);
  if (nan || !(m > -INFINITY)) return -1;
  const __m512 mv = _mm512_set1_ps(m);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = _mm512_mask_cmp_ps_mask(tail_mask(i, n), _mm512_loadu_ps(x + i), mv, _CMP_EQ_OQ);
    if (k) return i + __builtin_ctz(k);
  }
  return -1;
}

inline float log_sum_exp(const float* x, int64_t n, float m) {
  if (!(m > -INFINITY)) return m;
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(i, n);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv))));
  }
  return m + std::log(_mm512_reduce_add_ps(sum));
}

// The n largest values, best first (the first index among equals), into ids / vals; returns how
// many were found (fewer than n when the row has fewer non-NaN values).
inline int64_t top_n_of(const float* x, int64_t V, int64_t n, int64_t* ids, float* vals) {
  int64_t have = 0;
  for (int64_t i = 0; i < V; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(i, V), x + i);
    __mmask16 k = have < n ? _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q)
                           : _mm512_cmp_ps_mask(v, _mm512_set1_ps(vals[n - 1]), _CMP_GT_OQ);
    for (k &= tail_mask(i, V); k; k &= k - 1) {
      const int64_t j = i + __builtin_ctz(k);
      if (have == n && !(x[j] > vals[n - 1])) continue;
      int64_t pos = have < n ? have++ : n - 1;
      for (; pos > 0 && vals[pos - 1] < x[j]; --pos) vals[pos] = vals[pos - 1], ids[pos] = ids[pos - 1];
      vals[pos] = x[j], ids[pos] = j;
    }
  }
  return have;
}

struct RowArgs {
  const float* f;
  const int64_t* i;
  const int32_t *seen, *out, *bias_ids;
  int64_t n_seen, n_out, n_bias;
  const float* bias;
  const int64_t* eos;
  int64_t n_eos;
  const int32_t* mask;  // the row's grammar bitmask words, or null
};

template <typename T>
void sample_row(const T* x, int64_t V, const RowArgs& a, Scratch& sc, int64_t top_n, int64_t* token,
                float* logprob, int64_t* top_ids, float* top_lp) {
  float* buf = sc.buf.data();
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 k = tail_mask(i, V);
    _mm512_mask_storeu_ps(buf + i, k, load_masked(x + i, k));
  }
  const float* f = a.f;
  const int64_t flags = a.i[kFlags];
  if (f[kRepetition] != 1.f) {  // from the model's logit, so a token seen twice is penalised once
    const float rp = f[kRepetition];
    for (const auto& [ids, n] : {std::pair{a.seen, a.n_seen}, std::pair{a.out, a.n_out}})
      for (int64_t j = 0; j < n; ++j) {
        const int32_t id = ids[j];
        if (id < 0 || id >= V) continue;
        const float v = static_cast<float>(x[id]);
        buf[id] = v < 0 ? v * rp : v / rp;
      }
  }
  if (f[kFrequency] != 0.f || f[kPresence] != 0.f) {  // minus freq * count + presence, per token of the output
    int32_t* c = sc.counts.data();
    for (int64_t j = 0; j < a.n_out; ++j)
      if (a.out[j] >= 0 && a.out[j] < V) ++c[a.out[j]];
    for (int64_t j = 0; j < a.n_out; ++j) {
      const int32_t id = a.out[j];
      if (id < 0 || id >= V || c[id] == 0) continue;
      buf[id] -= f[kFrequency] * static_cast<float>(c[id]) + f[kPresence];
      c[id] = 0;
    }
  }
  for (int64_t j = 0; j < a.n_bias; ++j)
    if (a.bias_ids[j] >= 0 && a.bias_ids[j] < V) buf[a.bias_ids[j]] += a.bias[j];
  if (flags & kBanEos)
    for (int64_t j = 0; j < a.n_eos; ++j)
      if (a.eos[j] >= 0 && a.eos[j] < V) buf[a.eos[j]] = -INFINITY;
  float lse = NAN;
  if (flags & (kLogprob | kTopN)) {  // before the grammar and the warpers
    bool nan;
    lse = log_sum_exp(buf, V, max_of(buf, V, &nan));
    if ((flags & kTopN) && top_n > 0) {
      const int64_t have = top_n_of(buf, V, top_n, top_ids, top_lp);
      for (int64_t j = 0; j < have; ++j) top_lp[j] -= lse;
    }
  }
  if (a.mask != nullptr) {  // bit b of word w allows token 32 w + b
    for (int64_t i = 0; i < V; i += 16) {
      const uint32_t word = static_cast<uint32_t>(a.mask[i >> 5]);
      const __mmask16 allowed = static_cast<__mmask16>((i & 16) ? word >> 16 : word & 0xffffu);
      const __mmask16 k = tail_mask(i, V) & static_cast<__mmask16>(~allowed);
      _mm512_mask_storeu_ps(buf + i, k, _mm512_set1_ps(-INFINITY));
    }
  }
  const int64_t t = f[kTemperature] == 0.f ? argmax_of(buf, V) : draw(buf, V, a.f, a.i, sc);
  *token = t;
  if (t >= 0 && (flags & kLogprob)) *logprob = buf[t] - lse;  // the grammar allowed t: buf[t] is unmasked
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_rows(
    const at::Tensor& logits, const at::Tensor& fparams, const at::Tensor& iparams, const at::Tensor& seen_ids,
    const at::Tensor& seen_offsets, const at::Tensor& output_ids, const at::Tensor& output_offsets,
    const at::Tensor& bias_ids, const at::Tensor& bias_values, const at::Tensor& bias_offsets,
    const at::Tensor& eos_ids, const at::Tensor& bitmask, int64_t top_n) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() &&
              (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "sample_rows: contiguous [N, V] float32 or bfloat16 logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(fparams.sizes() == at::IntArrayRef({N, kNumF}) && fparams.scalar_type() == at::kFloat &&
              fparams.is_contiguous(), "sample_rows: fparams must be [N, 7] float32");
  TORCH_CHECK(iparams.sizes() == at::IntArrayRef({N, kNumI}) && iparams.scalar_type() == at::kLong &&
              iparams.is_contiguous(), "sample_rows: iparams must be [N, 5] int64");
  for (const at::Tensor* o : {&seen_offsets, &output_offsets, &bias_offsets})
    TORCH_CHECK(o->numel() == N + 1 && o->scalar_type() == at::kLong && o->is_contiguous(), "sample_rows: offsets must be [N + 1] int64");
  for (const at::Tensor* t : {&seen_ids, &output_ids, &bias_ids})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "sample_rows: token ids must be int32");
  TORCH_CHECK(bias_values.scalar_type() == at::kFloat && bias_values.numel() == bias_ids.numel(), "sample_rows: one float32 bias per id");
  TORCH_CHECK(seen_offsets.data_ptr<int64_t>()[N] <= seen_ids.numel() && output_offsets.data_ptr<int64_t>()[N] <= output_ids.numel() &&
              bias_offsets.data_ptr<int64_t>()[N] <= bias_ids.numel(), "sample_rows: offsets beyond their ids");
  TORCH_CHECK(eos_ids.scalar_type() == at::kLong && eos_ids.is_contiguous(), "sample_rows: eos_ids must be int64");
  TORCH_CHECK(bitmask.scalar_type() == at::kInt && bitmask.dim() == 2 && bitmask.is_contiguous() &&
              (bitmask.size(0) == 0 || bitmask.size(1) * 32 >= V), "sample_rows: bitmask must be [G, ceil(V / 32)] int32");
  const int64_t* ip = iparams.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r)
    TORCH_CHECK(ip[r * kNumI + kGrammarRow] < bitmask.size(0), "sample_rows: grammar row out of range");
  auto tokens = at::empty({N}, logits.options().dtype(at::kLong));
  auto logprobs = at::full({N}, NAN, logits.options().dtype(at::kFloat));
  auto top_ids = at::full({N, top_n}, -1, logits.options().dtype(at::kLong));
  auto top_lp = at::full({N, top_n}, NAN, logits.options().dtype(at::kFloat));
  const float* fp = fparams.data_ptr<float>();
  const int64_t *so = seen_offsets.data_ptr<int64_t>(), *oo = output_offsets.data_ptr<int64_t>(), *bo = bias_offsets.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    static thread_local Scratch sc;
    sc.reserve(V);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t g = ip[r * kNumI + kGrammarRow];
      const RowArgs a{fp + r * kNumF, ip + r * kNumI,
                      seen_ids.data_ptr<int32_t>() + so[r], output_ids.data_ptr<int32_t>() + oo[r],
                      bias_ids.data_ptr<int32_t>() + bo[r], so[r + 1] - so[r], oo[r + 1] - oo[r], bo[r + 1] - bo[r],
                      bias_values.data_ptr<float>() + bo[r], eos_ids.data_ptr<int64_t>(), eos_ids.numel(),
                      g >= 0 ? bitmask.data_ptr<int32_t>() + g * bitmask.size(1) : nullptr};
      int64_t* tok = tokens.data_ptr<int64_t>() + r;
      float* lp = logprobs.data_ptr<float>() + r;
      int64_t* ti = top_ids.data_ptr<int64_t>() + r * top_n;
      float* tl = top_lp.data_ptr<float>() + r * top_n;
      if (logits.scalar_type() == at::kBFloat16)
        sample_row<bf16>(logits.data_ptr<bf16>() + r * V, V, a, sc, top_n, tok, lp, ti, tl);
      else
        sample_row<float>(logits.data_ptr<float>() + r * V, V, a, sc, top_n, tok, lp, ti, tl);
    }
  });
  return {tokens, logprobs, top_ids, top_lp};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sagellm, m) {
  m.def("sample_rows(Tensor logits, Tensor fparams, Tensor iparams, Tensor seen_ids, Tensor seen_offsets, "
        "Tensor output_ids, Tensor output_offsets, Tensor bias_ids, Tensor bias_values, Tensor bias_offsets, "
        "Tensor eos_ids, Tensor bitmask, int top_n) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sagellm, CPU, m) { m.impl("sample_rows", sample_rows); }
