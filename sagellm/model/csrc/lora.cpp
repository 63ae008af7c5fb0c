// lora_add: the LoRA adapters of one step added to a fused projection's output, every row with its
// own adapter (sagellm/model/lora_stack.py stacks them), in one call:
//   y[t] += sum over columns c of row t's adapter: (x[t] . a[c]) * b[c, col_out[c]]
// x [T, in], y [T, out] (in place), a [R, in] (the adapters' A rows side by side), b [R, out]
// (row c nonzero only on its projection's output range col_out[c] = (start, end)), row_cols [T, 2]
// (the column range of row t's adapter; empty for base-model rows). Each row reads only its own
// adapter's columns, and rows of one adapter go in blocks of 4 so each weight read serves 4 rows.
// The shrunk value x[t] . a[c] is rounded to the dtype (as torch's matmul rounds its output), the
// expansion accumulated in float32 and added to y once.
// Measured (docs/performance.md, bench/lora.py): oneDNN's two calls per projection cost 40-130 us
// each in a served step, mostly per-call overhead, for a few hundred kilobytes of weights.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "simd.h"

namespace {

using namespace sagellm;

constexpr int kBlock = 4;  // rows of one adapter done together: each weight load feeds 4 FMAs
// Below this many multiply-adds a call runs on the calling thread. Measured (a decode step's 120
// calls, 16 rows on 4 adapters of SmolLM2, bench/lora.py's shape): from the engine's thread (not
// the process's first), splitting them over 2 OpenMP threads took 9.4 ms a step, one thread 6.1;
// from the first thread, 3.7 and 6.2.
constexpr int64_t kInlineWork = int64_t{1} << 22;

// Rows rows[0 .. NB) of one adapter (columns lo .. hi): the shrink, then, per run of columns with
// the same output range (q, k, v of one adapter write disjoint ranges), the expansion with the
// accumulators in registers, added to y once.
template <typename T, int NB>
void lora_block(const T* x, T* y, const T* a, const T* b, const int64_t* col_out, const int64_t* rows,
                int64_t lo, int64_t hi, int64_t in, int64_t out, float* s) {
  for (int64_t c = lo; c < hi; ++c) {
    const T* ac = a + c * in;
    __m512 v[NB];
    for (int r = 0; r < NB; ++r) v[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += 16) {
      const __m512 w = load16(ac + k);
      for (int r = 0; r < NB; ++r) v[r] = _mm512_fmadd_ps(load16(x + rows[r] * in + k), w, v[r]);
    }
    for (int r = 0; r < NB; ++r)  // rounded to T, as the matmul it replaces stores its output in T
      s[r * (hi - lo) + c - lo] = _mm512_cvtss_f32(round_to(_mm512_set1_ps(_mm512_reduce_add_ps(v[r])), x));
  }
  for (int64_t c0 = lo; c0 < hi;) {
    int64_t c1 = c0 + 1;
    while (c1 < hi && col_out[2 * c1] == col_out[2 * c0]) ++c1;
    for (int64_t j = col_out[2 * c0]; j < col_out[2 * c0 + 1]; j += 16) {
      __m512 acc[NB];
      for (int r = 0; r < NB; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t c = c0; c < c1; ++c) {
        const __m512 w = load16(b + c * out + j);
        for (int r = 0; r < NB; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * (hi - lo) + c - lo]), w, acc[r]);
      }
      for (int r = 0; r < NB; ++r) {
        T* yj = y + rows[r] * out + j;
        store16(yj, _mm512_add_ps(load16(yj), acc[r]));
      }
    }
    c0 = c1;
  }
}

template <typename T>
void lora_rows(const T* x, T* y, const T* a, const T* b, const int64_t* row_cols, const int64_t* col_out,
               int64_t rows, int64_t in, int64_t out) {
  // Rows grouped by adapter (column range), in blocks of up to kBlock: the work items.
  std::vector<int64_t> order;
  for (int64_t t = 0; t < rows; ++t)
    if (row_cols[2 * t] < row_cols[2 * t + 1]) order.push_back(t);
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return row_cols[2 * p] < row_cols[2 * q]; });
  std::vector<std::pair<int64_t, int>> items;  // (first position in order, rows)
  for (size_t i = 0; i < order.size();) {
    size_t j = i + 1;
    while (j < order.size() && j - i < kBlock && row_cols[2 * order[j]] == row_cols[2 * order[i]]) ++j;
    items.emplace_back(static_cast<int64_t>(i), static_cast<int>(j - i));
    i = j;
  }
  int64_t work = 0;  // multiply-adds: each row's columns times (in + its output range)
  for (int64_t t : order) work += (row_cols[2 * t + 1] - row_cols[2 * t]) * (in + out);
  const int64_t n = static_cast<int64_t>(items.size());
  at::parallel_for(0, n, work < kInlineWork ? n : 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t* rs = order.data() + items[it].first;
      const int64_t lo = row_cols[2 * rs[0]], hi = row_cols[2 * rs[0] + 1];
      s.resize(kBlock * (hi - lo));
      switch (items[it].second) {
        case 1: lora_block<T, 1>(x, y, a, b, col_out, rs, lo, hi, in, out, s.data()); break;
        case 2: lora_block<T, 2>(x, y, a, b, col_out, rs, lo, hi, in, out, s.data()); break;
        case 3: lora_block<T, 3>(x, y, a, b, col_out, rs, lo, hi, in, out, s.data()); break;
        default: lora_block<T, kBlock>(x, y, a, b, col_out, rs, lo, hi, in, out, s.data());
      }
    }
  });
}

at::Tensor lora_add(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                    const at::Tensor& row_cols, const at::Tensor& col_out) {
  const int64_t rows = x.size(0), in = x.size(1), out = y.size(1);
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && y.size(0) == rows && x.is_contiguous() && y.is_contiguous() &&
                  a.is_contiguous() && b.is_contiguous() && a.size(1) == in && b.size(1) == out &&
                  a.size(0) == b.size(0) && in % 16 == 0 && out % 16 == 0,
              "lora_add: contiguous x [T, 16k], y [T, 16k], a [R, in], b [R, out]");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && a.scalar_type() == y.scalar_type() &&
                  b.scalar_type() == y.scalar_type(), "lora_add: x, y, a, b must share a dtype");
  TORCH_CHECK(row_cols.scalar_type() == at::kLong && row_cols.is_contiguous() && row_cols.numel() == 2 * rows &&
                  col_out.scalar_type() == at::kLong && col_out.is_contiguous() && col_out.numel() == 2 * a.size(0),
              "lora_add: row_cols [T, 2] and col_out [R, 2] int64");
  const int64_t* rc = row_cols.data_ptr<int64_t>();
  const int64_t* co = col_out.data_ptr<int64_t>();
  if (y.scalar_type() == at::kBFloat16) {
    lora_rows<bf16>(x.data_ptr<bf16>(), y.data_ptr<bf16>(), a.data_ptr<bf16>(), b.data_ptr<bf16>(), rc, co, rows, in, out);
  } else {
    TORCH_CHECK(y.scalar_type() == at::kFloat, "lora_add: float32 or bfloat16 only");
    lora_rows<float>(x.data_ptr<float>(), y.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(), rc, co, rows,
                     in, out);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sagellm, m) {
  m.def("lora_add(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor row_cols, Tensor col_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(sagellm, CPU, m) { m.impl("lora_add", lora_add); }
