// Activations -> int8 per block of 32 values for linear_int8_act: symmetric, scale max|x| / 127,
// code rint(x / scale) clamped to [-128, 127] (the quantize op's "int8" arithmetic). A scalar
// version for any block and an AVX2 one for full blocks; both give the same codes and scale (the
// same IEEE division and round-to-nearest-even). At one token the scalar loop cost a 1.1B model
// ~0.4 ms per token (~1 ns per value, beside ~0.1 ns for the weights' dot products).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "alphaquant/quant_math.h"

namespace alphaquant {
namespace int8_act {

// Block of len <= 32 values -> codes qb[0, len) (qb[len, 32) = 0); returns the scale, adds the
// codes to sum, sets bad when the block holds NaN or Inf.
template <class T>
inline float quantize_block_scalar(const T* xb, int64_t len, int8_t* qb, int32_t& sum, bool& bad) {
  float amax = 0.0f;
  float v[32];
  for (int64_t i = 0; i < len; ++i) v[i] = static_cast<float>(xb[i]);
  for (int64_t i = 0; i < len; ++i) {
    bad |= !finite(v[i]);
    amax = max_of(amax, fabsf(v[i]));
  }
  float scale = amax / 127.0f;  // group_scale of symmetric int8
  if (!(scale > 0.0f) || !finite(scale)) scale = 1.0f;
  for (int64_t i = 0; i < len; ++i) {
    const int q = static_cast<int>(quantize_int_code(v[i], scale, 0.0f, -128.0f, 127.0f, 0, false)) - 128;
    qb[i] = static_cast<int8_t>(q);
    sum += q;
  }
  for (int64_t i = len; i < 32; ++i) qb[i] = 0;
  return scale;
}

#if defined(__x86_64__)
// Eight values widened to float32 exactly (bf16: the top half of a float32; fp16 by F16C).
__attribute__((target("avx2,f16c"))) inline __m256 load8_as_float(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,f16c"))) inline __m256 load8_as_float(const c10::BFloat16* p) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
__attribute__((target("avx2,f16c"))) inline __m256 load8_as_float(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// quantize_block_scalar for a full block of 32, in AVX2 registers. (Only non-finite blocks could
// differ from the scalar loop, in their scale; those are refused by the caller.)
template <class T>
__attribute__((target("avx2,f16c"))) inline float quantize_block32_avx2(const T* xb, int8_t* qb, int32_t& sum,
                                                                        bool& bad) {
  __m256 v[4];
  for (int j = 0; j < 4; ++j) v[j] = load8_as_float(xb + 8 * j);
  const __m256 zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
  __m256 finite_all = _mm256_cmp_ps(_mm256_sub_ps(v[0], v[0]), zero, _CMP_EQ_OQ);  // x - x is 0 unless NaN/Inf
  __m256 amax = _mm256_andnot_ps(sign, v[0]);
  for (int j = 1; j < 4; ++j) {
    finite_all = _mm256_and_ps(finite_all, _mm256_cmp_ps(_mm256_sub_ps(v[j], v[j]), zero, _CMP_EQ_OQ));
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
  }
  bad |= _mm256_movemask_ps(finite_all) != 0xFF;
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  float scale = _mm_cvtss_f32(m4) / 127.0f;
  if (!(scale > 0.0f) || !finite(scale)) scale = 1.0f;
  const __m256 s = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  __m256i q[4];
  for (int j = 0; j < 4; ++j) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(v[j], s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q[j] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
  }
  // int32 -> int8 (saturating packs work per 128-bit half; the permute puts the dwords in order)
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  sum += _mm_cvtsi128_si32(s4);
  return scale;
}
#endif

}  // namespace int8_act
}  // namespace alphaquant
