// Small helpers shared by the CUDA kernels: launch checks, element loads and stores.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "alphaquant/formats.h"

namespace alphaquant {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride loop over `n` items of `threads` per block.
inline int grid_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>(ceil_div(std::max<int64_t>(n, 1), threads), 65535 * 8));
}

// Codes in the block of 8 that starts `remaining` values before the end of the row.
__device__ __forceinline__ int block_len(int64_t remaining) { return remaining < 8 ? static_cast<int>(remaining) : 8; }

template <class T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<at::BFloat16>(at::BFloat16 v) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(&v));
}
template <>
__device__ __forceinline__ float to_float<at::Half>(at::Half v) {
  return __half2float(*reinterpret_cast<const __half*>(&v));
}

template <class T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

// Loads n (<= 8) consecutive values; 16-byte vector loads when the caller knows the block is
// whole and aligned (rows whose length is a multiple of 8 on a 16-byte aligned base).
template <class T>
__device__ __forceinline__ void load8(const T* __restrict__ p, float (&v)[8], int n, bool aligned) {
  if (aligned && n == 8) {
    constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < 8 / kPerVec; ++c) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + c);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerVec; ++i) v[c * kPerVec + i] = to_float(e[i]);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = i < n ? to_float(p[i]) : 0.0f;
}

template <class T>
__device__ __forceinline__ void store8(T* __restrict__ p, const float (&v)[8], int n, bool aligned) {
  if (aligned && n == 8) {
    constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < 8 / kPerVec; ++c) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerVec; ++i) e[i] = from_float<T>(v[c * kPerVec + i]);
      reinterpret_cast<uint4*>(p)[c] = raw;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (i < n) p[i] = from_float<T>(v[i]);
}

// The BITS bytes of a block of 8 codes, as one integer; word loads when aligned.
template <int BITS>
__device__ __forceinline__ uint64_t load_block_bits(const uint8_t* __restrict__ p, int nbytes, bool aligned) {
  if (aligned && nbytes == BITS) {
    if constexpr (BITS == 8) return __ldg(reinterpret_cast<const unsigned long long*>(p));
    if constexpr (BITS == 4) return __ldg(reinterpret_cast<const unsigned int*>(p));
    if constexpr (BITS == 2) return __ldg(reinterpret_cast<const unsigned short*>(p));
  }
  uint64_t v = 0;
#pragma unroll
  for (int b = 0; b < BITS; ++b)
    if (b < nbytes) v |= static_cast<uint64_t>(__ldg(p + b)) << (8 * b);
  return v;
}

template <int BITS>
__device__ __forceinline__ void store_block_bits(uint8_t* __restrict__ p, uint64_t v, int nbytes, bool aligned) {
  if (aligned && nbytes == BITS) {
    if constexpr (BITS == 8) { *reinterpret_cast<unsigned long long*>(p) = v; return; }
    if constexpr (BITS == 4) { *reinterpret_cast<unsigned int*>(p) = static_cast<unsigned int>(v); return; }
    if constexpr (BITS == 2) { *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(v); return; }
  }
#pragma unroll
  for (int b = 0; b < BITS; ++b)
    if (b < nbytes) p[b] = static_cast<uint8_t>(v >> (8 * b));
}

__device__ __forceinline__ bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace alphaquant
