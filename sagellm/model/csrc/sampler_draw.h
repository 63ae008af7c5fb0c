// The sampled draw of sagellm's sampler kernel (sampler.cpp), for one row: temperature, top_k,
// top_p, min_p, typical_p and the exponential race over the tokens they keep, with the counter-based
// random stream. A row's candidates are the tokens within a few nats of its best (kFirstFloor),
// widened until they hold all that the filters keep; only they are ordered (partially, by a
// histogram of their keys), never the whole vocabulary.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace sagellm::sampling {

enum Flags : int64_t { kBanEos = 1, kLogprob = 2, kTopN = 4 };
enum FParam { kTemperature, kTopP, kMinP, kTypicalP, kRepetition, kFrequency, kPresence, kNumF };
enum IParam { kTopK, kSeed, kIndex, kFlags, kGrammarRow, kNumI };

// ---- the random stream (sampler_torch.py computes the same numbers) ----

inline uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z ^= z >> 30;
  z *= 0xbf58476d1ce4e5b9ULL;
  z ^= z >> 27;
  z *= 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

inline uint64_t row_key(uint64_t seed, uint64_t index) { return mix64(seed ^ mix64(index + 0x9e3779b97f4a7c15ULL)); }

// A 32-bit integer hash whose multipliers are below 2^31 (so torch's int64 arithmetic can repeat it).
inline __m512i hash32(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x21f0aaad));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x735a2d97));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
}

// log(x) for normal x > 0: x = m 2^e, m in [0.75, 1.5), log m = 2 atanh((m - 1) / (m + 1)) to t^9
// (relative error ~1e-7).
inline __m512 log16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero);
  __m512 e = _mm512_getexp_ps(x);
  e = _mm512_mask_add_ps(e, _mm512_cmp_ps_mask(m, one, _CMP_LT_OQ), e, one);  // m was halved
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
  const __m512 t2 = _mm512_mul_ps(t, t);
  __m512 p = _mm512_set1_ps(1.f / 9);
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(1.f / 7));
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(1.f / 5));
  p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(1.f / 3));
  p = _mm512_fmadd_ps(p, t2, one);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693147180559945309f), _mm512_mul_ps(_mm512_add_ps(t, t), p));
}

// Exp(1) variates for 16 token ids: -log(u), u = ((hash >> 9) + 0.5) / 2^23 in (0, 1), exact in float.
inline __m512 exponential16(__m512i ids, __m512i k0, __m512i k1) {
  const __m512i h = hash32(_mm512_xor_si512(hash32(_mm512_xor_si512(ids, k0)), k1));
  const __m512 u = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 9)), _mm512_set1_ps(0.5f)),
                                 _mm512_set1_ps(1.f / 8388608.f));
  return _mm512_sub_ps(_mm512_setzero_ps(), log16(u));
}

// A token more than this many nats below the best cannot win the race: the best has w = 1 and
// E <= 24 ln 2 = 16.6, so w / E >= 0.06, while w < e^-21 = 7.6e-10 and E >= 6e-8 give w / E < 0.013.
constexpr float kRaceFloor = -21.f;
// Where candidates start for top_k / top_p rows (nats below the best, after the temperature):
// on the bundled model at temperature 0.8 this held the whole top_p 0.95 nucleus in every row of
// a served batch, with a median of 56 candidates; rows that need more widen to kRaceFloor, then
// to every token.
constexpr float kFirstFloor = -10.f;

inline __mmask16 tail_mask(int64_t i, int64_t n) {
  return n - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1);
}
// max(x[0 .. n)); *nan says whether any value was NaN.
inline float max_of(const float* x, int64_t n, bool* nan) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  __mmask16 bad = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail_mask(i, n), x + i);
    bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, v);
  }
  *nan = bad != 0;
  return _mm512_reduce_max_ps(mx);
}

struct Scratch {  // per thread and kept across calls: no allocation (page faults) per step
  std::vector<float> buf, s, cand_s, cand_w, key, tmp_s, tmp_w;
  std::vector<int32_t> cand_i, tmp_i, counts;
  std::vector<uint64_t> order;
  void reserve(int64_t V) {
    if (static_cast<int64_t>(buf.size()) >= V + 16) return;
    const size_t n = V + 16;
    for (auto* v : {&buf, &s, &cand_s, &cand_w, &key, &tmp_s, &tmp_w}) v->resize(n);
    cand_i.resize(n), tmp_i.resize(n), counts.assign(n, 0), order.resize(n);
  }
};

// Tokens with s >= floor (s > -inf when floor is -inf) into cand_i / cand_s; returns how many.
inline int64_t collect(const float* s, int64_t V, float floor, int32_t* cand_i, float* cand_s) {
  const __m512 fv = _mm512_set1_ps(floor);
  const bool all = std::isinf(floor);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t n = 0;
  for (int64_t i = 0; i < V; i += 16, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16))) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(i, V), s + i);
    const __mmask16 k = tail_mask(i, V) & (all ? _mm512_cmp_ps_mask(v, fv, _CMP_GT_OQ) : _mm512_cmp_ps_mask(v, fv, _CMP_GE_OQ));
    if (!k) continue;
    // Compress in a register, then a plain store: Zen 4's compress-to-memory is microcoded.
    _mm512_storeu_si512(cand_i + n, _mm512_maskz_compress_epi32(k, idx));
    _mm512_storeu_ps(cand_s + n, _mm512_maskz_compress_ps(k, v));
    n += __builtin_popcount(k);
  }
  return n;
}

inline void exp_of(const float* s, float* w, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(i, n);
    _mm512_mask_storeu_ps(w + i, k, exp16(_mm512_maskz_loadu_ps(k, s + i)));
  }
}

// The candidates: token ids, scaled logits s and weights w = exp(s), `n` of them.
struct Cands {
  int32_t* i;
  float *s, *w;
  int64_t n;
};

// sc.order[0 .. m) <- the positions `pos` ordered by key ascending, then by position.
inline void order_by(Scratch& sc, const float* key, const int64_t* pos, int64_t m, int64_t first) {
  uint64_t* o = sc.order.data();
  for (int64_t j = 0; j < m; ++j) {
    uint32_t u;
    std::memcpy(&u, &key[pos ? pos[j] : j], 4);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending float <-> ascending bits
    o[j] = (static_cast<uint64_t>(u) << 32) | static_cast<uint64_t>(pos ? pos[j] : j);
  }
  if (first < m) std::nth_element(o, o + first, o + m);
  std::sort(o, o + std::min(first, m));
}

// Keeps the candidates at positions order[0 .. m) (low 32 bits), in that order.
inline void keep_only(Scratch& sc, Cands& c, int64_t m) {
  const uint64_t* o = sc.order.data();
  for (int64_t j = 0; j < m; ++j) {
    const int64_t p = static_cast<int64_t>(o[j] & 0xffffffffu);
    sc.tmp_i[j] = c.i[p], sc.tmp_s[j] = c.s[p], sc.tmp_w[j] = c.w[p];
  }
  std::memcpy(c.i, sc.tmp_i.data(), m * sizeof(int32_t));
  std::memcpy(c.s, sc.tmp_s.data(), m * sizeof(float));
  std::memcpy(c.w, sc.tmp_w.data(), m * sizeof(float));
  c.n = m;
}

// Walks candidates in the order of `key` (ascending, then position) and keeps each one while the
// weight before it is below `limit` (the first always): top_p by -s, typical_p by the distance to
// the entropy. No full sort: a histogram of the keys finds the bucket where the mass crosses the
// limit, and only that bucket's candidates are sorted.
inline void keep_by_mass(Scratch& sc, Cands& c, const float* key, double limit) {
  constexpr int64_t kBuckets = 1024;
  std::vector<int64_t> before, edge;  // positions in buckets before the crossing one, in it
  double cum = 0;
  if (c.n > 256) {
    float kmin = INFINITY, kmax = -INFINITY;
    for (int64_t j = 0; j < c.n; ++j) kmin = std::min(kmin, key[j]), kmax = std::max(kmax, key[j]);
    const double scale = kmax > kmin ? (kBuckets - 1) / (static_cast<double>(kmax) - kmin) : 0.0;
    auto bucket = [&](int64_t j) { return std::min<int64_t>(kBuckets - 1, static_cast<int64_t>((key[j] - kmin) * scale)); };
    std::vector<double> mass(kBuckets, 0.0);
    for (int64_t j = 0; j < c.n; ++j) mass[bucket(j)] += c.w[j];
    int64_t crossing = 0;
    for (; crossing < kBuckets - 1 && cum + mass[crossing] < limit; ++crossing) cum += mass[crossing];
    for (int64_t j = 0; j < c.n; ++j) {
      const int64_t b = bucket(j);
      if (b < crossing) before.push_back(j);
      else if (b == crossing) edge.push_back(j);
    }
  } else {
    edge.resize(c.n);
    for (int64_t j = 0; j < c.n; ++j) edge[j] = j;
  }
  order_by(sc, key, edge.data(), static_cast<int64_t>(edge.size()), static_cast<int64_t>(edge.size()));
  int64_t m = 0;
  const int64_t kept_before = static_cast<int64_t>(before.size());
  for (; m < static_cast<int64_t>(edge.size()); ++m) {
    if (kept_before + m > 0 && cum >= limit) break;
    cum += c.w[sc.order[m] & 0xffffffffu];
  }
  // order <- the kept: the crossing bucket's first m, then the buckets before it
  uint64_t* o = sc.order.data();
  for (int64_t j = 0; j < kept_before; ++j) o[m + j] = static_cast<uint64_t>(before[j]);
  keep_only(sc, c, m + kept_before);
}

// The race over the candidates: the token id of argmax w / E, -1 if no w > 0.
inline int64_t race(const Cands& c, uint64_t key) {
  const __m512i k0 = _mm512_set1_epi32(static_cast<int32_t>(key));
  const __m512i k1 = _mm512_set1_epi32(static_cast<int32_t>(key >> 32));
  float best = 0.f;
  int64_t arg = -1;
  for (int64_t i = 0; i < c.n; i += 16) {
    const __mmask16 k = tail_mask(i, c.n);
    const __m512 e = exponential16(_mm512_maskz_loadu_epi32(k, c.i + i), k0, k1);
    const __m512 r = _mm512_maskz_div_ps(k, _mm512_maskz_loadu_ps(k, c.w + i), e);
    const float m = _mm512_reduce_max_ps(r);
    if (m > best) best = m, arg = i + __builtin_ctz(_mm512_cmp_ps_mask(r, _mm512_set1_ps(m), _CMP_EQ_OQ));
  }
  return arg < 0 ? -1 : c.i[arg];
}

// Whether the candidates at `floor` hold everything the filters keep and the race can pick.
inline bool enough(const float* f, int64_t top_k, float floor, int64_t count, double cand_mass, double z) {
  if (std::isinf(floor)) return true;
  const bool top_p = f[kTopP] < 1.f, typical = f[kTypicalP] < 1.f;
  bool bounded = false;  // the kept set lies within the candidates
  if (top_k > 0) {
    if (count >= top_k) bounded = true;
    else if (top_p || typical) return false;  // the top_k set's mass reaches below the floor
  }
  if (top_p && top_k <= 0 && cand_mass >= f[kTopP] * z * (1 + 1e-6)) bounded = true;
  if (f[kMinP] > 0.f && std::log(f[kMinP]) >= floor) bounded = true;
  if (typical && !bounded) return false;
  return bounded || floor <= kRaceFloor;
}

// temperature > 0: the drawn token, -1 if none can be (nothing allowed, NaN logits or parameters).
inline int64_t draw(const float* x, int64_t V, const float* f, const int64_t* ip, Scratch& sc) {
  bool nan;
  const float m = max_of(x, V, &nan);
  if (nan || !(m > -INFINITY) || !(f[kTemperature] > 0.f)) return -1;
  const int64_t top_k = ip[kTopK];
  const bool top_p = f[kTopP] < 1.f, typical = f[kTypicalP] < 1.f, min_p = f[kMinP] > 0.f;
  const bool need_z = top_p && top_k <= 0;
  // s = (x - max) / T, -inf kept -inf; the full normaliser z only where top_p needs it.
  float* s = sc.s.data();
  const __m512 mv = _mm512_set1_ps(m), inv_t = _mm512_set1_ps(1.f / f[kTemperature]);
  __m512 zsum = _mm512_setzero_ps();
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 k = tail_mask(i, V);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + i);
    __m512 sv = _mm512_mul_ps(_mm512_sub_ps(v, mv), inv_t);
    sv = _mm512_mask_mov_ps(sv, _mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), v);
    _mm512_mask_storeu_ps(s + i, k, sv);
    if (need_z) zsum = _mm512_add_ps(zsum, _mm512_maskz_mov_ps(k, exp16(sv)));
  }
  const double z = _mm512_reduce_add_ps(zsum);
  Cands c{sc.cand_i.data(), sc.cand_s.data(), sc.cand_w.data(), 0};
  float floor = typical && top_k <= 0 && !top_p && !min_p ? -INFINITY
                : top_k > 0 || top_p                      ? kFirstFloor
                : min_p                                   ? std::max(std::log(f[kMinP]), kRaceFloor)
                                                          : kRaceFloor;
  for (;;) {
    c.n = collect(s, V, floor, c.i, c.s);
    exp_of(c.s, c.w, c.n);
    double cand_mass = 0;
    if (need_z) for (int64_t j = 0; j < c.n; ++j) cand_mass += c.w[j];
    if (enough(f, top_k, floor, c.n, cand_mass, z)) break;
    floor = floor > kRaceFloor ? kRaceFloor : -INFINITY;
  }
  if (c.n == 0) return -1;  // a NaN temperature
  float* key = sc.key.data();
  if (top_k > 0 && top_k < c.n) {  // the k best, and the equals of the k-th (`logits < kth` masks only below it)
    for (int64_t j = 0; j < c.n; ++j) key[j] = 0.f - c.s[j];
    order_by(sc, key, nullptr, c.n, top_k);
    const float kth = c.s[sc.order[top_k - 1] & 0xffffffffu];
    int64_t keep = top_k;
    for (int64_t j = top_k; j < c.n; ++j)
      if (c.s[sc.order[j] & 0xffffffffu] == kth) sc.order[keep++] = sc.order[j];
    keep_only(sc, c, keep);
  }
  if (top_p) {  // drop a token once the ones before it reach top_p of the mass (the best stays)
    double norm = 0;
    if (top_k > 0) for (int64_t j = 0; j < c.n; ++j) norm += c.w[j];
    else norm = z;
    for (int64_t j = 0; j < c.n; ++j) key[j] = 0.f - c.s[j];
    keep_by_mass(sc, c, key, f[kTopP] * norm);
  }
  if (min_p) {  // w relative to the best (w = 1): keep w >= min_p
    int64_t keep = 0;
    for (int64_t j = 0; j < c.n; ++j)
      if (c.w[j] >= f[kMinP]) c.i[keep] = c.i[j], c.s[keep] = c.s[j], c.w[keep] = c.w[j], ++keep;
    c.n = keep;
  }
  if (typical && c.n > 1) {  // closest -log q to the entropy first, up to typical_p of the mass
    double total = 0, h = 0;
    for (int64_t j = 0; j < c.n; ++j) total += c.w[j];
    const double log_total = std::log(total);
    for (int64_t j = 0; j < c.n; ++j)
      if (c.w[j] > 0) h -= c.w[j] / total * (c.s[j] - log_total);
    for (int64_t j = 0; j < c.n; ++j) key[j] = static_cast<float>(std::fabs(log_total - c.s[j] - h));
    keep_by_mass(sc, c, key, f[kTypicalP] * total);
  }
  return race(c, row_key(static_cast<uint64_t>(ip[kSeed]), static_cast<uint64_t>(ip[kIndex])));
}

}  // namespace sagellm::sampling
