// Eight float32 values stored in the output dtype. bf16 is converted in AVX2 registers, bit for bit
// as c10::BFloat16 converts (round to nearest even, NaN -> 0x7FC0): its scalar conversion does not
// vectorize and made dequantizing to bf16 several times slower than to float32.
#pragma once

#include "cpu/cpu_variant.h"

#include <c10/util/BFloat16.h>

#include <cstdint>
#if AQ_AVX2
#include <immintrin.h>
#endif

namespace alphaquant {
namespace AQ_CPU_VARIANT {  // cpu_variant.h

template <class T>
inline void store_block8(T* dst, const float* v) {
  for (int i = 0; i < 8; ++i) dst[i] = static_cast<T>(v[i]);
}

#if AQ_AVX2
template <>
inline void store_block8<c10::BFloat16>(c10::BFloat16* dst, const float* v) {
  const __m256 f = _mm256_loadu_ps(v);
  const __m256i bits = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  // 32-bit lanes -> 16 bits: packus works per 128-bit half, the permute puts the halves in order
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
}
#endif

}  // namespace AQ_CPU_VARIANT
}  // namespace alphaquant
