// AVX2 inner loops of the CPU quantize op: a group's min/max and the integer codes of a group,
// eight values at a time. The same float32 operations in the same order per value as the scalar
// code of quant_math.h (true division, then the zero point added, round to nearest even,
// clamp), so codes and scales are bit-identical to it; min/max reductions are exact in any order.
#pragma once

#include "cpu/cpu_variant.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#include "alphaquant/quant_math.h"

#if AQ_AVX2
#include <immintrin.h>

namespace alphaquant {
namespace AQ_CPU_VARIANT {  // cpu_variant.h

template <class T>
constexpr bool kHaveAvx2Quantize =
    std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// Eight values widened to float32 exactly (bf16: the bits shifted up; fp16: the F16C conversion).
template <class T>
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// GroupStats::add over x[0, n), n a multiple of 8: non-finite values count as 0 for the range.
template <class T>
inline GroupStats group_stats_avx2(const T* x, int64_t n) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 fmax = _mm256_set1_ps(kFloatMax);
  __m256 mn = _mm256_set1_ps(INFINITY), mx = _mm256_set1_ps(-INFINITY);
  int bad = 0;
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = load8(x + i);
    const __m256 ok = _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), fmax, _CMP_LE_OQ);  // false for NaN
    const __m256 fv = _mm256_and_ps(ok, v);
    mn = _mm256_min_ps(fv, mn);  // fv < mn ? fv : mn, as min_of(mn, fv)
    mx = _mm256_max_ps(fv, mx);
    bad |= _mm256_movemask_ps(ok) ^ 0xff;
  }
  alignas(32) float lo[8], hi[8];
  _mm256_store_ps(lo, mn);
  _mm256_store_ps(hi, mx);
  GroupStats s;
  for (int l = 0; l < 8; ++l) s.merge({.mn = lo[l], .mx = hi[l], .nonfinite = false});
  s.nonfinite = bad != 0;
  return s;
}

// quantize_int_code (round to nearest) of x[0, n), n a multiple of 8, into codes; returns
// whether any value was NaN/Inf.
template <class T>
inline bool int_codes_avx2(const T* x, int64_t n, ScaleZero sz, float qmin, float qmax, uint8_t* codes) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 fmax = _mm256_set1_ps(kFloatMax);
  const __m256 s = _mm256_set1_ps(sz.scale), z = _mm256_set1_ps(sz.zero);
  const __m256 lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
  int bad = 0;
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = load8(x + i);
    bad |= _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(v, abs_mask), fmax, _CMP_LE_OQ)) ^ 0xff;
    __m256 q = _mm256_round_ps(_mm256_add_ps(_mm256_div_ps(v, s), z), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(hi, _mm256_max_ps(lo, q));  // min_of(max_of(q, qmin), qmax)
    const __m256i c = _mm256_cvttps_epi32(_mm256_sub_ps(q, lo));
    const __m128i c16 = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(c16, c16));
  }
  return bad != 0;
}

}  // namespace AQ_CPU_VARIANT
}  // namespace alphaquant

#else

namespace alphaquant {
namespace AQ_CPU_VARIANT {  // cpu_variant.h
template <class T>
constexpr bool kHaveAvx2Quantize = false;
template <class T>
inline GroupStats group_stats_avx2(const T*, int64_t) { return {}; }
template <class T>
inline bool int_codes_avx2(const T*, int64_t, ScaleZero, float, float, uint8_t*) { return false; }
}  // namespace AQ_CPU_VARIANT
}  // namespace alphaquant

#endif
