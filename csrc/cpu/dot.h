// Dot product of two float rows, shared by the CPU linear kernels (linear_cpu.cpp, codebook_cpu.cpp).
#pragma once

#include "cpu/cpu_variant.h"

#include <cstdint>

#include "cpu/linear_avx2.h"

namespace alphaquant {
namespace AQ_CPU_VARIANT {  // cpu_variant.h

// sum_i a[i] * b[i]: AVX2 fused multiply-adds where available, else eight independent partial
// sums that the compiler can keep in one vector register.
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float head = 0.0f;
#if AQ_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  head = hsum(_mm256_add_ps(acc0, acc1));
#endif
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return head + ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

}  // namespace AQ_CPU_VARIANT
}  // namespace alphaquant
