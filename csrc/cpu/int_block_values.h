// Values of a block of 8 integer codes, shared by the CPU kernels that decode packed integers.
#pragma once

#include "cpu/cpu_variant.h"

#include <cstdint>
#include <cstring>
#if AQ_AVX2
#include <immintrin.h>
#endif

#include "alphaquant/bitstream.h"
#include "alphaquant/quant_math.h"

namespace alphaquant {
namespace AQ_CPU_VARIANT {  // cpu_variant.h

// Values of a whole block of 8 integer codes: saturate((c + qmin - z) * s), the same float
// operations as dequantize_int_code. With AVX2, widths up to 4 bits are unpacked by per-lane
// shifts of one 32-bit word.
#if AQ_AVX2
template <int BITS>
constexpr bool kUnpacksInRegisters = BITS <= 4;  // int_block_values reads the packed bytes, not c
#else
template <int BITS>
constexpr bool kUnpacksInRegisters = false;
#endif

template <int BITS>
inline void int_block_values(const uint8_t* src, const uint8_t* c, float qmin, float z, float s, float* v) {
#if AQ_AVX2
  if constexpr (BITS <= 4) {
    const uint32_t word = static_cast<uint32_t>(load_le<BITS>(src));  // bitstream.h: no forwarding stall
    const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
    const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts),
                                           _mm256_set1_epi32((1 << BITS) - 1));
    const __m256 f = _mm256_cvtepi32_ps(codes);
    const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_add_ps(f, _mm256_set1_ps(qmin)), _mm256_set1_ps(z)),
                                   _mm256_set1_ps(s));
    // max_ps/min_ps return their second operand when one is NaN, as max_of/min_of return their first
    const __m256 lo = _mm256_max_ps(_mm256_set1_ps(-kFloatMax), d);
    _mm256_storeu_ps(v, _mm256_min_ps(_mm256_set1_ps(kFloatMax), lo));
    return;
  }
#endif
  for (int i = 0; i < 8; ++i) v[i] = dequantize_int_code(c[i], s, z, qmin);
}

}  // namespace AQ_CPU_VARIANT
}  // namespace alphaquant
