// The int8-activation linear kernel with AVX2 (int8_act_layout.h), for x86-64 CPUs without
// AVX-512 VNNI: vpmaddubsw (unsigned code x signed activation, pairs summed in int16) and
// vpmaddwd (pairs of those in int32) in place of vpdpbusd, a 64-byte word as two halves of 8
// rows. Codes stored in bytes (5-8 bits) are split into nibbles so that the int16 pair sums of
// vpmaddubsw cannot saturate (255 * 127 * 2 would). Compiled for AVX2 whatever the build flags.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "cpu/int8_act_layout.h"
#include "cpu/int8_act_passes.h"

namespace alphaquant {
namespace int8_act {
namespace {

// sum of c * x over groups of four bytes, in 8 int32 lanes; c unsigned below 16, x signed.
inline __m256i dot4(__m256i c, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), _mm256_set1_epi16(1));
}

// 8 params from element i on: float32, or float16 widened.
inline __m256 load8(const Problem& p, int64_t i) {
  if (p.params_f16) {
    const uint16_t* h = static_cast<const uint16_t*>(p.params) + i;
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
  }
  return _mm256_loadu_ps(static_cast<const float*>(p.params) + i);
}

// One block's words [w0, w1) (all of them, or one 16-value group's half) times R activation rows:
// dot[r] += the integer sums, 8 rows of the tile (this half of each word) in 8 int32 lanes.
template <int SBITS, int R, bool TABLE>
inline void block_words(const uint8_t* wb, int w0, int w1, int64_t b, const int32_t* const (&xw)[R], __m256i mask,
                        __m256i table, __m256i (&dot)[R]) {
  constexpr int kFields = SBITS == 8 ? 1 : 8 / SBITS;
#pragma GCC unroll 8
  for (int w = w0; w < w1; ++w) {
    const __m256i word = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + w * kWordBytes));
    if constexpr (SBITS == 8) {
      const __m256i lo = _mm256_and_si256(word, mask), hi = _mm256_and_si256(_mm256_srli_epi16(word, 4), mask);
      const int64_t quad = b * 8 + w;
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_set1_epi32(xw[r][quad]);
        dot[r] = _mm256_add_epi32(dot[r], _mm256_add_epi32(dot4(lo, x), _mm256_slli_epi32(dot4(hi, x), 4)));
      }
    } else {
#pragma GCC unroll 4
      for (int s = 0; s < kFields; ++s) {
        __m256i c = _mm256_and_si256(_mm256_srli_epi16(word, SBITS * s), mask);
        if constexpr (TABLE) c = _mm256_shuffle_epi8(table, c);
        const int64_t quad = b * 8 + kFields * w + s;
        for (int r = 0; r < R; ++r) dot[r] = _mm256_add_epi32(dot[r], dot4(c, _mm256_set1_epi32(xw[r][quad])));
      }
    }
  }
}

// Rows [r0, r0 + R) of x times one half (8 rows) of tile t; HALF: groups of 16 values, each half
// of a block's words summed apart and scaled into its own group (as the AVX-512 kernel).
template <int SBITS, int R, bool TABLE, bool HALF>
void half_tile_rows(const Problem& p, int64_t t, int half, int64_t r0) {
  constexpr int64_t kBB = tile_block_bytes(SBITS);
  const int64_t kpad = p.kblocks * kBlock;
  const uint8_t* wt = p.codes + t * p.kblocks * kBB + half * 32;
  const int64_t pstride = p.pcount * kTileRows;  // params per group of a tile
  const int64_t p0 = t * p.groups * pstride + half * 8;
  const __m256i mask = _mm256_set1_epi8(static_cast<char>(SBITS == 8 ? 15 : (1 << SBITS) - 1));
  // 4-bit codes of a float grid -> their grid values (below 128: vpmaddubsw's pairs cannot saturate)
  const __m256i table =
      TABLE ? _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.table16))) : mask;
  const int32_t* xw[R];
  for (int r = 0; r < R; ++r) xw[r] = reinterpret_cast<const int32_t*>(p.xq + (r0 + r) * kpad);
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  // block b's weight bytes (this half's 32 bytes of each word), asked for 4 KB ahead
  auto block = [&](int64_t b) {
    const uint8_t* wb = wt + b * kBB;
#pragma GCC unroll 8
    for (int w = 0; w < SBITS; ++w) _mm_prefetch(reinterpret_cast<const char*>(wb + 4096 + w * kWordBytes), _MM_HINT_T0);
    return wb;
  };
  // integer sums of words [w0, w1) of block b, scaled by the activation rows' block scales
  auto block_sums = [&](const uint8_t* wb, int64_t b, int w0, int w1, __m256 (&sums)[R], bool add) {
    __m256i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
    block_words<SBITS, R, TABLE>(wb, w0, w1, b, xw, mask, table, dot);
    for (int r = 0; r < R; ++r) {
      const __m256 d = _mm256_set1_ps(p.xscale[(r0 + r) * p.kblocks + b]);
      sums[r] = add ? _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), d, sums[r]) : _mm256_mul_ps(_mm256_cvtepi32_ps(dot[r]), d);
    }
  };
  auto add_group = [&](int64_t g, const __m256 (&sums)[R]) {
    const __m256 s = load8(p, p0 + g * pstride);
    const __m256 o = p.pcount == 2 ? load8(p, p0 + g * pstride + kTileRows) : _mm256_mul_ps(s, _mm256_set1_ps(p.qoff));
    for (int r = 0; r < R; ++r) {
      total[r] = _mm256_fmadd_ps(sums[r], s, total[r]);
      total[r] = _mm256_fmadd_ps(o, _mm256_set1_ps(p.xoffset[(r0 + r) * p.groups + g]), total[r]);
    }
  };
  __m256 acc[R];
  if constexpr (HALF) {
    for (int64_t b = 0; b < p.kblocks; ++b) {
      const uint8_t* wb = block(b);
      block_sums(wb, b, 0, SBITS / 2, acc, false);
      add_group(2 * b, acc);
      if (2 * b + 1 >= p.groups) break;
      block_sums(wb, b, SBITS / 2, SBITS, acc, false);
      add_group(2 * b + 1, acc);
    }
  } else {
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t b0 = g * p.blocks_per_group;
      const int64_t b1 = b0 + p.blocks_per_group < p.kblocks ? b0 + p.blocks_per_group : p.kblocks;
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t b = b0; b < b1; ++b) block_sums(block(b), b, 0, SBITS, acc, true);
      add_group(g, acc);
    }
  }
  const int64_t first = t * kTileRows + half * 8;
  const int64_t lanes = p.n - first < 8 ? p.n - first : 8;
  for (int r = 0; r < R; ++r) {
    alignas(32) float out[8];
    _mm256_store_ps(out, total[r]);
    float* yr = p.y + (r0 + r) * p.n + first;
    for (int64_t lane = 0; lane < lanes; ++lane)
      yr[lane] = out[lane] * p.out_scale + (p.bias ? p.bias[first + lane] : 0.0f);
  }
}

}  // namespace

void run_tiles_avx2(const Problem& p, int64_t tile0, int64_t tile1) {
  by_field_width(p, [&]<int SBITS, bool TABLE>() {
    for (int64_t t = tile0; t < tile1; ++t)  // x rows 4 per pass: 3 x 4 accumulators of 16 registers
      for (int half = 0; half < 2 && t * kTileRows + half * 8 < p.n; ++half)
        for_row_passes<4>(p.m, [&]<int R>(int64_t r0) {
          if (p.half_groups) {
            half_tile_rows<SBITS, R, TABLE, true>(p, t, half, r0);
          } else {
            half_tile_rows<SBITS, R, TABLE, false>(p, t, half, r0);
          }
        });
  });
}

}  // namespace int8_act
}  // namespace alphaquant
#endif
