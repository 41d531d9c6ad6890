// AVX2 inner loop of the CPU linear op for weights of 1, 2, 4 or 8 bits (integers, and the
// fp4/fp8 float formats and the nf4/lut4 code books through a table of their values: 4-bit
// tables in two registers, looked up with permutes; fp8's 256 entries with a gather).
//
// Eight packed bytes are widened to eight 32-bit lanes; "plane" p of those lanes, (lane >>
// p*bits) & mask, holds codes (8/bits)*j + p for j = 0..7. Instead of reordering codes, x is
// reordered once per call into the same plane order (permute_x), so the inner loop is
// shift, mask, convert, fused multiply-add.
#pragma once

#include "cpu/cpu_variant.h"

#if AQ_AVX2
#include <immintrin.h>

#include "alphaquant/bitstream.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace alphaquant {
namespace AQ_CPU_VARIANT {  // cpu_variant.h

constexpr bool kHaveAvx2Linear = true;

// Codes per 8-byte chunk.
inline int64_t chunk_codes(int bits) { return 64 / bits; }

// x [m, k] -> the plane order of each 8-byte chunk: out[c][p][j] = x[c*64/bits + (8/bits)*j + p].
inline std::vector<float> permute_x(const float* x, int64_t m, int64_t k, int bits) {
  const int64_t per = chunk_codes(bits), planes = 8 / bits;
  std::vector<float> out(m * k);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < k / per; ++c)
      for (int64_t p = 0; p < planes; ++p)
        for (int64_t j = 0; j < 8; ++j)
          out[r * k + c * per + p * 8 + j] = x[r * k + c * per + planes * j + p];
  return out;
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// Eight codes -> their values: the integer itself, or a float format's table entry.
template <bool TABLE>
inline __m256 code_values(__m256i codes, const float* table) {
  if constexpr (TABLE) {
    return _mm256_i32gather_ps(table, codes, 4);
  } else {
    return _mm256_cvtepi32_ps(codes);
  }
}

// Eight 4-bit codes -> table[code] with the 16-entry table held in two registers (no memory
// gather): each half is looked up by the code's low three bits, bit 3 picks the half.
inline __m256 table16_values(__m256i codes, __m256 lo, __m256 hi) {
  const __m256 from_lo = _mm256_permutevar8x32_ps(lo, codes);
  const __m256 from_hi = _mm256_permutevar8x32_ps(hi, codes);
  return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}

// FP8 and FP6 codes decoded by the F16C converter instead of a table gather: E5M2 is the top
// byte of a float16; the other formats' exponent and mantissa bits placed under a float16's
// sign (the mantissa at its top) give their value times 2^-8 (E4M3), 2^-12 (E3M2) or 2^-14
// (E2M3), subnormals included. E4M3's 0x7F / 0xFF are its NaNs; FP6 has no special codes.
enum F16cDecode { kF16cNone = 0, kFp8E4M3 = 1, kFp8E5M2 = 2, kFp6E3M2 = 3, kFp6E2M3 = 4 };

#if AQ_AVX2
// Eight FP6 codes (one per 32-bit lane) -> their values.
template <int FP6>
inline __m256 fp6_values(__m256i codes) {
  const __m128i c = _mm_packus_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
  constexpr int kShift = FP6 == kFp6E3M2 ? 8 : 7;  // mantissa bits 2 or 3 below float16's 10
  const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x20)), 10),
                                 _mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x1F)), kShift));
  return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(FP6 == kFp6E3M2 ? 4096.0f : 16384.0f));
}
#endif

#if AQ_AVX2
template <int FP8>
inline __m256 fp8_values(const uint8_t* bytes) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  if constexpr (FP8 == kFp8E5M2) {
    return _mm256_cvtph_ps(_mm_slli_epi16(b, 8));
  } else {
    const __m128i mag = _mm_and_si128(b, _mm_set1_epi16(0x7F));
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8), _mm_slli_epi16(mag, 7));
    const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
    const __m128i nan16 = _mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7F));
    return _mm256_blendv_ps(v, _mm256_set1_ps(NAN), _mm256_castsi256_ps(_mm256_cvtepi16_epi32(nan16)));
  }
}
#endif

// sum over [c0, c1) chunks of value(code) * xp for up to M rows of permuted x; acc[r] +=
// result. value(code) is the code itself for integers, table[code] (a gather) for float formats,
// or for FP8 (8-bit codes) the F16C decode above.
template <int BITS, int M, bool TABLE, int DECODE = kF16cNone>
inline void dot_chunks(const uint8_t* w, const float* xp, int64_t k, int64_t c0, int64_t c1, __m256 (&acc)[M],
                       const float* table = nullptr) {
#if AQ_AVX2
  if constexpr (DECODE != kF16cNone) {
    static_assert(BITS == 8, "FP8 codes are bytes");
    for (int64_t c = c0; c < c1; ++c) {
      const __m256 code = fp8_values<DECODE>(w + c * 8);
#pragma GCC unroll 16
      for (int r = 0; r < M; ++r) acc[r] = _mm256_fmadd_ps(code, _mm256_loadu_ps(xp + r * k + c * 8), acc[r]);
    }
    return;
  }
#endif
  constexpr int kPlanes = 8 / BITS;
  constexpr int64_t kPer = 64 / BITS;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  constexpr bool kTable16 = TABLE && BITS == 4;  // 4-bit tables (fp4, nf4, lut4) live in registers
  const __m256 t_lo = kTable16 ? _mm256_loadu_ps(table) : _mm256_setzero_ps();
  const __m256 t_hi = kTable16 ? _mm256_loadu_ps(table + 8) : _mm256_setzero_ps();
  for (int64_t c = c0; c < c1; ++c) {
    const __m256i lanes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c * 8)));
#pragma GCC unroll 8
    for (int p = 0; p < kPlanes; ++p) {
      const __m256i codes = _mm256_and_si256(_mm256_srli_epi32(lanes, p * BITS), mask);
      __m256 code;
      if constexpr (kTable16) {
        code = table16_values(codes, t_lo, t_hi);
      } else {
        code = code_values<TABLE>(codes, table);
      }
#pragma GCC unroll 16
      for (int r = 0; r < M; ++r) {
        acc[r] = _mm256_fmadd_ps(code, _mm256_loadu_ps(xp + r * k + c * kPer + p * 8), acc[r]);
      }
    }
  }
}

// The same for 6-bit codes: a chunk is 8 codes in 6 bytes, in natural order (x not permuted).
// The 48 bits are broadcast to four 64-bit lanes and shifted per lane, four codes at a time.
template <int M, bool TABLE, int DECODE = kF16cNone>
inline void dot_chunks6(const uint8_t* w, const float* x, int64_t k, int64_t c0, int64_t c1, __m256 (&acc)[M],
                        const float* table = nullptr) {
  const __m256i lo_shifts = _mm256_setr_epi64x(0, 6, 12, 18);
  const __m256i hi_shifts = _mm256_setr_epi64x(24, 30, 36, 42);
  const __m256i mask = _mm256_set1_epi64x(63);
  const __m256i low_dwords = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  for (int64_t c = c0; c < c1; ++c) {
    const uint64_t bits = load_le<6>(w + c * 6);  // bitstream.h: no store-forwarding stall (int6 was 9x slower)
    const __m256i v = _mm256_set1_epi64x(static_cast<long long>(bits));
    const __m256i lo = _mm256_permutevar8x32_epi32(_mm256_and_si256(_mm256_srlv_epi64(v, lo_shifts), mask), low_dwords);
    const __m256i hi = _mm256_permutevar8x32_epi32(_mm256_and_si256(_mm256_srlv_epi64(v, hi_shifts), mask), low_dwords);
    const __m256i codes = _mm256_blend_epi32(lo, hi, 0xF0);
    __m256 code;
#if AQ_AVX2
    if constexpr (DECODE != kF16cNone) {
      code = fp6_values<DECODE>(codes);
    } else {
      code = code_values<TABLE>(codes, table);
    }
#else
    code = code_values<TABLE>(codes, table);
#endif
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r) acc[r] = _mm256_fmadd_ps(code, _mm256_loadu_ps(x + r * k + c * 8), acc[r]);
  }
}

}  // namespace AQ_CPU_VARIANT
}  // namespace alphaquant

#else
namespace alphaquant {
namespace AQ_CPU_VARIANT {  // cpu_variant.h
constexpr bool kHaveAvx2Linear = false;
}  // namespace AQ_CPU_VARIANT
}  // namespace alphaquant
#endif
