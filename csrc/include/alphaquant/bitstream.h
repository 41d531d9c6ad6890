// Packing and unpacking of one row's bit stream (layout: formats.h), for CPU and CUDA.
#pragma once

#include "alphaquant/formats.h"
#include "alphaquant/layout.h"

namespace alphaquant {

// Writes `n` codes (n <= 8) starting at a multiple of 8 codes: exactly block_bytes(n, BITS) bytes.
template <int BITS>
AQ_HD void store_block(uint8_t* dst, const uint8_t* codes, int n) {
  uint64_t v = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(i < n ? codes[i] : 0) << (i * BITS);
  const int nbytes = block_bytes(n, BITS);
#pragma unroll
  for (int b = 0; b < BITS; ++b) {
    if (b < nbytes) dst[b] = static_cast<uint8_t>(v >> (8 * b));
  }
}

#if !defined(__CUDA_ARCH__)
// The N (1..8) bytes at src as a little-endian integer, from loads of 4, 2 and 1 bytes joined in
// registers: copying N bytes into a zeroed 8-byte variable and reading it back whole stalls the
// CPU's store-to-load forwarding for N = 3, 5, 6, 7 (unpacking 6-bit codes ran 20x slower).
template <int N>
inline uint64_t load_le(const uint8_t* src) {
  if constexpr (N == 8) {
    uint64_t v;
    std::memcpy(&v, src, 8);
    return v;
  } else if constexpr (N >= 4) {
    uint32_t v;
    std::memcpy(&v, src, 4);
    return v | (load_le<N - 4>(src + 4) << 32);
  } else if constexpr (N >= 2) {
    uint16_t v;
    std::memcpy(&v, src, 2);
    return v | (load_le<N - 2>(src + 2) << 16);
  } else if constexpr (N == 1) {
    return src[0];
  } else {
    return 0;
  }
}
#endif

// Reads the block of 8 codes at `src` (only block_bytes(n, BITS) are touched) into `codes`.
template <int BITS>
AQ_HD void load_block(const uint8_t* src, uint8_t* codes, int n) {
  const int nbytes = block_bytes(n, BITS);
  uint64_t v = 0;
#if !defined(__CUDA_ARCH__)
  if (n == 8) {
    v = load_le<BITS>(src);  // unaligned loads on little-endian hosts (x86, Arm)
  } else
#endif
  {
#pragma unroll
    for (int b = 0; b < BITS; ++b) {
      if (b < nbytes) v |= static_cast<uint64_t>(src[b]) << (8 * b);
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) codes[i] = unpack1<BITS>(v, i);
}

// codes[0..n) -> the row's bytes from `dst` on; the first code must be at a multiple of 8.
template <int BITS>
AQ_HD void pack_run(uint8_t* dst, const uint8_t* codes, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) store_block<BITS>(dst + (j / 8) * BITS, codes + j, 8);
  if (j < n) store_block<BITS>(dst + (j / 8) * BITS, codes + j, static_cast<int>(n - j));
}

template <int BITS>
AQ_HD void unpack_run(const uint8_t* src, uint8_t* codes, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) load_block<BITS>(src + (j / 8) * BITS, codes + j, 8);
  if (j < n) {
    uint8_t tmp[8];
    load_block<BITS>(src + (j / 8) * BITS, tmp, static_cast<int>(n - j));
    for (int64_t i = 0; i < n - j; ++i) codes[j + i] = tmp[i];
  }
}

}  // namespace alphaquant
