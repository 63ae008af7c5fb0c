// gemm_rows_bf16: y = x W^T for rows of bf16 activations (a decode step at batch 1..64; under
// BATCH_INVARIANT every call, prefill chunks too) against bf16 weights, float32 sums on VDPBF16PS, each result rounded to bf16 once.
// x [..., M, K]; wp: W [N, K] packed by cpu_linear.pack_rows_weight into [ceil(N/64), ceil(K/2),
// 64, 2] (zero padded): for each 64-column block, for each pair of k, the 64 columns' two
// values side by side, so one block's weights are one contiguous stream. y [..., M, N].
// Outer-product tiles of 64 columns x 6 rows = 24 zmm sums, 4 weight loads and 6 broadcasts per
// 24 VDPBF16PS, no horizontal sums (a dot-product form over W's rows, 4 x 4 tiles, lost to oneDNN
// at every M >= 4 on SmolLM2's K = 576: 16 lane reductions per 18 chunks of k). The two OpenMP
// threads take halves of the column blocks; all M rows pass each block while it sits in L2, so W
// streams from memory once per call.
// Why not oneDNN's packed _linear_pointwise: ~13 us a call before any arithmetic (a 64 x 64 weight
// takes 13.7 us, F.linear 3.3 us), 121 calls a SmolLM2 step, and less of the CPU at M = 2..64
// (bench/linear_rows.py: 1.3-1.8x it at M = 2, 1.1-1.4x at 16, 1.02-1.14x at 64). It also
// replaced a one-row kernel over a row-major W (gemv_bf16): 1.2-2x that at M = 1.
// Each output is one lane's chain over the pairs of k in order: its value does not depend on M,
// on its tile or on the thread (a row's result is the same alone or in any batch).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

using bf16 = at::BFloat16;

constexpr int64_t kCols = 64;  // columns (outputs) per block: 4 zmm of float32 sums
constexpr int kRows = 6;  // activation rows per tile
constexpr int64_t kPrefetchPairs = 16;  // pairs of k ahead the first tile prefetches W from
constexpr int64_t kRowChunkBytes = 256 << 10;  // rows of x per pass over the column blocks

// x[2p], x[2p + 1] (the second 0 past K) in each 32-bit lane.
inline __m512i pair(const bf16* x, int64_t p, int64_t K) {
  if (2 * p + 1 < K) {
    uint32_t v;
    std::memcpy(&v, x + 2 * p, 4);
    return _mm512_set1_epi32(static_cast<int>(v));
  }
  uint16_t lo;
  std::memcpy(&lo, x + 2 * p, 2);
  return _mm512_set1_epi32(lo);
}

// Rows [0, R) of x (stride K) against one packed column block wb [KP, 64, 2], into y (stride N),
// the block's first `cols` columns.
template <int R>
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl"))) void tile(
    const bf16* x, const bf16* wb, bf16* y, int64_t K, int64_t N, int64_t cols, bool prefetch) {
  const int64_t KP = (K + 1) / 2;
  __m512 acc[R][4];
  for (int j = 0; j < R; ++j)
    for (int c = 0; c < 4; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < KP; ++p) {
    const bf16* w = wb + p * kCols * 2;
    if (prefetch) {
      const char* ahead = reinterpret_cast<const char*>(w + kPrefetchPairs * kCols * 2);  // may pass the end: a hint
      for (int c = 0; c < 4; ++c) _mm_prefetch(ahead + 64 * c, _MM_HINT_T0);
    }
    __m512bh wv[4];
    for (int c = 0; c < 4; ++c) wv[c] = (__m512bh)_mm512_loadu_si512(w + 32 * c);
    for (int j = 0; j < R; ++j) {
      const __m512bh xv = (__m512bh)pair(x + j * K, p, K);
      for (int c = 0; c < 4; ++c) acc[j][c] = _mm512_dpbf16_ps(acc[j][c], wv[c], xv);
    }
  }
  for (int j = 0; j < R; ++j)
    for (int c = 0; c < 4; ++c) {
      const int64_t n = std::min<int64_t>(16, cols - 16 * c);
      if (n <= 0) break;
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(acc[j][c]);
      _mm256_mask_storeu_epi16(y + j * N + 16 * c, static_cast<__mmask16>((1u << n) - 1), v);
    }
}

void chunk_blocks(const bf16* x, const bf16* wp, bf16* y, int64_t b0, int64_t b1, int64_t M, int64_t K,
                  int64_t N) {
  const int64_t KP = (K + 1) / 2;
  for (int64_t b = b0; b < b1; ++b) {
    const bf16* wb = wp + b * KP * kCols * 2;
    const int64_t n0 = b * kCols, cols = std::min(kCols, N - n0);
    int64_t m = 0;
    for (; m + kRows <= M; m += kRows) tile<kRows>(x + m * K, wb, y + m * N + n0, K, N, cols, m == 0);
    const bf16* xm = x + m * K;
    bf16* ym = y + m * N + n0;
    switch (M - m) {
      case 1: tile<1>(xm, wb, ym, K, N, cols, m == 0); break;
      case 2: tile<2>(xm, wb, ym, K, N, cols, m == 0); break;
      case 3: tile<3>(xm, wb, ym, K, N, cols, m == 0); break;
      case 4: tile<4>(xm, wb, ym, K, N, cols, m == 0); break;
      case 5: tile<5>(xm, wb, ym, K, N, cols, m == 0); break;
      default: break;
    }
  }
}

void blocks(const bf16* x, const bf16* wp, bf16* y, int64_t b0, int64_t b1, int64_t M, int64_t K, int64_t N) {
  // Prefill-sized M (BATCH_INVARIANT) in chunks of ~256 KB of x, each chunk through all the
  // blocks: x and one block of W stay in L2 together (M = 512 of K = 1536 at once, 1.5 MB of x,
  // ran at 0.82x oneDNN). Never under 66 rows: a decode step (M <= 64) streams W once.
  const int64_t chunk = std::max<int64_t>(11 * kRows, (kRowChunkBytes / (2 * K)) / kRows * kRows);
  for (int64_t m0 = 0; m0 < M; m0 += chunk)
    chunk_blocks(x + m0 * K, wp, y + m0 * N, b0, b1, std::min(chunk, M - m0), K, N);
}

at::Tensor gemm_rows_bf16(const at::Tensor& x, const at::Tensor& wp, int64_t N) {
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "gemm_rows_bf16: the CPU lacks AVX512-BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && wp.scalar_type() == at::kBFloat16,
              "gemm_rows_bf16: bfloat16 only");
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "gemm_rows_bf16: x must be contiguous rows");
  const int64_t K = x.size(-1), KP = (K + 1) / 2, NB = (N + kCols - 1) / kCols;
  TORCH_CHECK(K > 0 && N > 0 && wp.is_contiguous() && wp.dim() == 4 && wp.size(0) == NB && wp.size(1) == KP &&
              wp.size(2) == kCols && wp.size(3) == 2,
              "gemm_rows_bf16: wp must be a contiguous [", NB, ", ", KP, ", 64, 2] packing of W [", N, ", ", K, "]");
  const int64_t M = x.numel() / K;
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  if (M == 0) return y;
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wpp = wp.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  // Small products (a weight under ~256 KB, counted once per 64 rows) stay on the calling thread:
  // a wake-up costs more than their rows. Only the split of column blocks changes, never a sum.
  const int64_t grain = N * K * ((M + 63) / 64) < (int64_t{1} << 17) ? NB : 1;
  at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) { blocks(xp, wpp, yp, b0, b1, M, K, N); });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sagellm, m) { m.def("gemm_rows_bf16(Tensor x, Tensor wp, int n) -> Tensor"); }

TORCH_LIBRARY_IMPL(sagellm, CPU, m) { m.impl("gemm_rows_bf16", gemm_rows_bf16); }
