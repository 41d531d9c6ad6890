// The int8-activation linear kernel in plain C++ (int8_act_layout.h): what non-x86 machines run,
// and what ALPHAQUANT_CPU_ISA=portable selects so that tests keep it correct.
#include <c10/util/Half.h>

#include <cstring>

#include "cpu/int8_act_layout.h"

namespace alphaquant {
namespace int8_act {

namespace {

// Integer dot products of one tile's block with one activation row's block: dot[lane] for the
// tile's 16 rows, over words [w0, w1) of the block (all: the block; half of them: a 16-value group).
void block_dots(const uint8_t* words, const int8_t* q, int sbits, const uint8_t* table16, int w0, int w1,
                int32_t (&dot)[kTileRows]) {
  const int fields = 8 / sbits;
  const int mask = (1 << sbits) - 1;
  for (int lane = 0; lane < kTileRows; ++lane) dot[lane] = 0;
  for (int p = w0; p < w1; ++p) {
    const uint8_t* word = words + p * kWordBytes;
    for (int s = 0; s < fields; ++s) {
      const int8_t* q4 = q + 4 * (fields * p + s);
      for (int lane = 0; lane < kTileRows; ++lane)
        for (int i = 0; i < 4; ++i) {
          const int c = (word[4 * lane + i] >> (sbits * s)) & mask;
          dot[lane] += (table16 ? table16[c] : c) * q4[i];
        }
    }
  }
}

float param(const Problem& p, int64_t i) {
  if (p.params_f16) {
    return static_cast<float>(c10::Half(static_cast<const uint16_t*>(p.params)[i], c10::Half::from_bits()));
  }
  return static_cast<const float*>(p.params)[i];
}

}  // namespace

void run_tiles_portable(const Problem& p, int64_t tile0, int64_t tile1) {
  const int64_t bb = tile_block_bytes(p.sbits), kpad = p.kblocks * kBlock;
  for (int64_t t = tile0; t < tile1; ++t) {
    const uint8_t* wt = p.codes + t * p.kblocks * bb;
    const int64_t pstride = p.pcount * kTileRows, p0 = t * p.groups * pstride;
    const int64_t lanes = p.n - t * kTileRows < kTileRows ? p.n - t * kTileRows : kTileRows;
    for (int64_t r = 0; r < p.m; ++r) {
      float total[kTileRows] = {};
      // the group's scale times its integer sums, plus its offset term (int8_act_layout.h)
      auto add_group = [&](int64_t g, const float (&acc)[kTileRows]) {
        const float xo = p.xoffset[r * p.groups + g];
        for (int lane = 0; lane < kTileRows; ++lane) {
          const float s = param(p, p0 + g * pstride + lane);
          const float o = p.pcount == 2 ? param(p, p0 + g * pstride + kTileRows + lane) : s * p.qoff;
          total[lane] += acc[lane] * s + o * xo;
        }
      };
      for (int64_t b = 0; p.half_groups && b < p.kblocks; ++b) {
        const float d = p.xscale[r * p.kblocks + b];
        for (int h = 0; h < 2 && 2 * b + h < p.groups; ++h) {
          int32_t dot[kTileRows];
          block_dots(wt + b * bb, p.xq + r * kpad + b * kBlock, p.sbits, p.table16, h * p.sbits / 2,
                     (h + 1) * p.sbits / 2, dot);
          float acc[kTileRows];
          for (int lane = 0; lane < kTileRows; ++lane) acc[lane] = static_cast<float>(dot[lane]) * d;
          add_group(2 * b + h, acc);
        }
      }
      for (int64_t g = 0; !p.half_groups && g < p.groups; ++g) {
        const int64_t b0 = g * p.blocks_per_group;
        const int64_t b1 = b0 + p.blocks_per_group < p.kblocks ? b0 + p.blocks_per_group : p.kblocks;
        float acc[kTileRows] = {};
        for (int64_t b = b0; b < b1; ++b) {
          int32_t dot[kTileRows];
          block_dots(wt + b * bb, p.xq + r * kpad + b * kBlock, p.sbits, p.table16, 0, p.sbits, dot);
          const float d = p.xscale[r * p.kblocks + b];
          for (int lane = 0; lane < kTileRows; ++lane) acc[lane] += static_cast<float>(dot[lane]) * d;
        }
        add_group(g, acc);
      }
      float* yr = p.y + r * p.n + t * kTileRows;
      for (int64_t lane = 0; lane < lanes; ++lane)
        yr[lane] = total[lane] * p.out_scale + (p.bias ? p.bias[t * kTileRows + lane] : 0.0f);
    }
  }
}

}  // namespace int8_act
}  // namespace alphaquant
