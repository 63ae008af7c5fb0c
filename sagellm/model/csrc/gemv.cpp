// gemv_bf16: y = x W^T for one row of bf16 activations against bf16 weights (a decode step at
// batch 1), float32 sums on VDPBF16PS, the result rounded to bf16 once. x [1, K], w [N, K]
// row-major, y [1, N]. The two OpenMP threads take halves of W's rows, so each streams one
// contiguous range; 4 rows at a time share each load of x.
// Measured on this project's 2-core Zen 4 machines (bf16 SmolLM2-135M shapes, weights beyond L3):
// oneDNN's packed _linear_pointwise costs ~13 us a call before any arithmetic (a 64 x 64 weight
// takes 13.7 us, F.linear 3.3 us), and a decode step makes 121 of them; its layer matmuls stream
// 17-22 GB/s where one pass over memory reads 37 GB/s.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

using bf16 = at::BFloat16;

constexpr int64_t kRows = 4;  // weight rows per pass over x
constexpr int64_t kPrefetchRows = 8;  // rows ahead the next passes' weights are prefetched from

// 32 bf16 values from p, lanes n .. 31 zero (n in 1 .. 32).
inline __m512i load32(const bf16* p, int64_t n) {
  if (n >= 32) return _mm512_loadu_si512(p);
  return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << n) - 1), p);
}

__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl")))
void rows_dot(const bf16* x, const bf16* w, bf16* y, int64_t begin, int64_t end, int64_t K) {
  int64_t r = begin;
  for (; r + kRows <= end; r += kRows) {
    const bf16* w0 = w + r * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      const int64_t n = K - k;
      const __m512bh xv = (__m512bh)load32(x + k, n);
      const char* ahead = reinterpret_cast<const char*>(w0 + kPrefetchRows * K + k);  // may pass W's end: a hint
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 2 * K, _MM_HINT_T0);
      _mm_prefetch(ahead + 4 * K, _MM_HINT_T0);
      _mm_prefetch(ahead + 6 * K, _MM_HINT_T0);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)load32(w0 + k, n), xv);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)load32(w0 + K + k, n), xv);
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)load32(w0 + 2 * K + k, n), xv);
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)load32(w0 + 3 * K + k, n), xv);
    }
    y[r] = bf16(_mm512_reduce_add_ps(a0));
    y[r + 1] = bf16(_mm512_reduce_add_ps(a1));
    y[r + 2] = bf16(_mm512_reduce_add_ps(a2));
    y[r + 3] = bf16(_mm512_reduce_add_ps(a3));
  }
  for (; r < end; ++r) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      const int64_t n = K - k;
      a = _mm512_dpbf16_ps(a, (__m512bh)load32(w + r * K + k, n), (__m512bh)load32(x + k, n));
    }
    y[r] = bf16(_mm512_reduce_add_ps(a));
  }
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "gemv_bf16: the CPU lacks AVX512-BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bfloat16 only");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "gemv_bf16: w must be a contiguous [N, K] matrix");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.numel() == K && x.is_contiguous(), "gemv_bf16: x must hold one contiguous row of ", K);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  const int64_t blocks = (N + kRows - 1) / kRows;
  // Whole 4-row blocks per thread; small weights (under ~256 KB) stay on the calling thread.
  const int64_t grain = N * K < (int64_t{1} << 17) ? blocks : 1;
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    rows_dot(xp, wp, yp, b0 * kRows, std::min(b1 * kRows, N), K);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sagellm, m) { m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(sagellm, CPU, m) { m.impl("gemv_bf16", gemv_bf16); }
