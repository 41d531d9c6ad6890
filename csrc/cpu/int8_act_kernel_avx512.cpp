// The int8-activation linear kernel with AVX-512 VNNI (int8_act_layout.h): one vpdpbusd per
// 64-byte field of a tile's block and activation row gives 16 rows x 4 products, summed in the
// 16 int32 lanes. Rows of x are taken R at a time so that each unpacked weight word is used R
// times. Compiled for AVX-512 whatever the build flags; called only on CPUs that have it.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
// GCC 12 warns that the undefined pass-through operand of the intrinsics' masked builtins
// (_mm512_undefined_*) is or may be used uninitialized where they are inlined: the all-ones mask
// never reads it.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>



#include "cpu/int8_act_layout.h"
#include "cpu/int8_act_passes.h"

namespace alphaquant {
namespace int8_act {
namespace {

// 16 params from element i on: float32, or float16 widened.
inline __m512 load16(const Problem& p, int64_t i) {
  if (p.params_f16) {
    const uint16_t* h = static_cast<const uint16_t*>(p.params) + i;
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
  }
  return _mm512_loadu_ps(static_cast<const float*>(p.params) + i);
}

// How far ahead of the block being multiplied its thread asks for the weight's bytes: the
// hardware prefetcher alone leaves one core at ~27 GB/s on this machine's memory; 4 KB ahead
// gave SmolLM2-to-1B-sized layers at one token ~15% more (4 KB and 8 KB alike, 1 KB and 16 KB less).
constexpr int64_t kPrefetchBytes = 4096;

// Rows [r0, r0 + R) of x times tile t. Groups of whole blocks: each block's integer sums are
// scaled by its activation scale into the group's float sums. HALF (groups of 16 values,
// Problem::half_groups): each half of a block's words (fields 0-3, 4-7) is summed apart and
// scaled into its own group.
template <int SBITS, int R, bool TABLE, bool HALF>
void tile_rows(const Problem& p, int64_t t, int64_t r0) {
  constexpr int kFields = 8 / SBITS;
  constexpr int64_t kBB = tile_block_bytes(SBITS);
  const int64_t kpad = p.kblocks * kBlock;
  const uint8_t* wt = p.codes + t * p.kblocks * kBB;
  const int64_t pstride = p.pcount * kTileRows;  // params per group of a tile
  const int64_t p0 = t * p.groups * pstride;
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << SBITS) - 1));
  // 4-bit codes of a float grid -> their grid values, by a byte shuffle within each 128-bit lane
  const __m512i table =
      TABLE ? _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.table16))) : mask;
  const int32_t* xw[R];
  for (int r = 0; r < R; ++r) xw[r] = reinterpret_cast<const int32_t*>(p.xq + (r0 + r) * kpad);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  // block b's weight bytes, asked for kPrefetchBytes ahead
  auto block = [&](int64_t b) {
    const uint8_t* wb = wt + b * kBB;
#pragma GCC unroll 8
    for (int w = 0; w < SBITS; ++w)
      _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchBytes + w * kWordBytes), _MM_HINT_T0);
    return wb;
  };
  // integer sums of words [W0, W1) of block b with the R activation rows, scaled by their block scales
  auto block_sums = [&]<int W0, int W1>(const uint8_t* wb, int64_t b, __m512 (&sums)[R], bool add) {
    __m512i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int w = W0; w < W1; ++w) {
      const __m512i word = _mm512_loadu_si512(wb + w * kWordBytes);
#pragma GCC unroll 4
      for (int s = 0; s < kFields; ++s) {
        __m512i c = SBITS == 8 ? word : _mm512_and_si512(_mm512_srli_epi16(word, SBITS * s), mask);
        if constexpr (TABLE) c = _mm512_shuffle_epi8(table, c);
        const int64_t quad = b * 8 + kFields * w + s;
        for (int r = 0; r < R; ++r) dot[r] = _mm512_dpbusd_epi32(dot[r], c, _mm512_set1_epi32(xw[r][quad]));
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_set1_ps(p.xscale[(r0 + r) * p.kblocks + b]);
      sums[r] = add ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), d, sums[r]) : _mm512_mul_ps(_mm512_cvtepi32_ps(dot[r]), d);
    }
  };
  // total += group g's sums times its scales, plus its offset term
  auto add_group = [&](int64_t g, const __m512 (&sums)[R]) {
    const __m512 s = load16(p, p0 + g * pstride);
    const __m512 o = p.pcount == 2 ? load16(p, p0 + g * pstride + kTileRows) : _mm512_mul_ps(s, _mm512_set1_ps(p.qoff));
    for (int r = 0; r < R; ++r) {
      total[r] = _mm512_fmadd_ps(sums[r], s, total[r]);
      total[r] = _mm512_fmadd_ps(o, _mm512_set1_ps(p.xoffset[(r0 + r) * p.groups + g]), total[r]);
    }
  };
  __m512 acc[R];
  if constexpr (HALF) {
    for (int64_t b = 0; b < p.kblocks; ++b) {
      const uint8_t* wb = block(b);
      block_sums.template operator()<0, SBITS / 2>(wb, b, acc, false);
      add_group(2 * b, acc);
      if (2 * b + 1 >= p.groups) break;
      block_sums.template operator()<SBITS / 2, SBITS>(wb, b, acc, false);
      add_group(2 * b + 1, acc);
    }
  } else {
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t b0 = g * p.blocks_per_group;
      const int64_t b1 = b0 + p.blocks_per_group < p.kblocks ? b0 + p.blocks_per_group : p.kblocks;
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t b = b0; b < b1; ++b) block_sums.template operator()<0, SBITS>(block(b), b, acc, true);
      add_group(g, acc);
    }
  }
  const int64_t lanes = p.n - t * kTileRows < kTileRows ? p.n - t * kTileRows : kTileRows;
  const __mmask16 keep = static_cast<__mmask16>((1u << lanes) - 1u);
  const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(keep, p.bias + t * kTileRows) : _mm512_setzero_ps();
  const __m512 out_scale = _mm512_set1_ps(p.out_scale);
  for (int r = 0; r < R; ++r)
    _mm512_mask_storeu_ps(p.y + (r0 + r) * p.n + t * kTileRows, keep,
                          _mm512_fmadd_ps(total[r], out_scale, bias));
}

}  // namespace

void run_tiles_avx512_vnni(const Problem& p, int64_t tile0, int64_t tile1) {
  by_field_width(p, [&]<int SBITS, bool TABLE>() {
    for (int64_t t = tile0; t < tile1; ++t)  // x rows 8 per pass: 3 x 8 accumulators of 32 registers
      for_row_passes<8>(p.m, [&]<int R>(int64_t r0) {
        if (p.half_groups) {
          tile_rows<SBITS, R, TABLE, true>(p, t, r0);
        } else {
          tile_rows<SBITS, R, TABLE, false>(p, t, r0);
        }
      });
  });
}

}  // namespace int8_act
}  // namespace alphaquant
#endif
