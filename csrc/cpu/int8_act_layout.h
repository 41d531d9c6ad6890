// The int8-activation path of the CPU linear op (llama.cpp's approach): activations quantized to
// int8 per block of 32 values, integer dot products of weight codes and activation codes, one
// float multiply-add per block. This header defines the weight's "CPU layout" that the path reads
// (written by the int8_act_layout op, int8_act_layout_cpu.cpp) and the kernels' interface; the
// kernels per instruction set are int8_act_kernel_{avx512,avx2,portable}.cpp.
//
// Layout. Output features are taken 16 at a time (a tile: one 512-bit register of int32 lanes)
// and k 32 at a time (a block). A tile's block is stored as `sbits` 64-byte words; byte 4*row + i
// of word p holds, in its bit field s (sbits bits each, P = 8 / sbits fields), the code of
// (row, 32*block + 4*(P*p + s) + i). So one word gives, per field, four consecutive codes of each
// of the 16 rows: what vpdpbusd multiplies with four broadcast activation bytes, accumulating the
// 16 rows' dot products in 16 lanes with no horizontal sums. Codes of 1-2 bits are stored in 2-bit
// fields, 3-4 bits in 4-bit fields, 5-8 bits in bytes; rows past n and columns past k hold code 0.
//
// Math. For weight group g of row j (scale s, zero point z, codes c) and activation block b of
// row r (scale d, int8 codes q), sum_i w_i x_i ~= sum_b d_b s_g (sum_i c_i q_i + (qmin - z) sum_i q_i).
// Per tile and group the layout keeps the 16 rows' s (`params`, [tiles, groups, P, 16]) and, for
// weights with zero points (P = 2), o = s * (qmin - z); without, o = s * qmin. The second term is
// o times sum_b d_b * (sum of q over b), a number per activation row and group. Scales given in
// float16 stay float16 when P = 1 (half the bytes a token reads), else params are float32.
// Float formats whose values are an integer grid (int8_act_grid.h: fp4/fp6 E2M1/E2M3, MX or not)
// compute the same way with c replaced by the code's grid value u and qmin by -bias; the result is
// divided by the grid's factor (a power of two) at the end. Byte fields hold u itself, 4-bit
// fields the code, looked up in a 16-entry table (vpshufb).
// Groups of 16 values (nvfp4's blocks, or any format's group_size 16): block b holds groups 2b
// and 2b + 1, whose codes are the first and second halves of the block's words (fields 0-3 and
// 4-7); the kernels scale each half's integer sums by its own group's params.
#pragma once

#include <cstdint>

namespace alphaquant {
namespace int8_act {

constexpr int kTileRows = 16;  // output features per tile
constexpr int kBlock = 32;     // activation values per int8 block (one float scale each)
constexpr int kHalfBlock = 16; // the one group size below a block: two groups per block
constexpr int kWordBytes = 64;

// (The helpers are static: this header is also compiled for AVX-512 and AVX2 in the kernels' files,
// and an inline function shared with the rest of the build could be linked in that form.)
// Bits of each code's field in the layout for a format of `bits` bits.
static constexpr int storage_bits(int bits) { return bits <= 2 ? 2 : bits <= 4 ? 4 : 8; }
// Bytes of one tile's block: 16 rows x 32 codes of sbits bits.
static constexpr int64_t tile_block_bytes(int sbits) { return int64_t{kTileRows} * kBlock * sbits / 8; }

static constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One call of the integer kernel: y [m, n] = x [m, k] @ W.T (+ bias), tiles [tile0, tile1).
struct Problem {
  const uint8_t* codes;   // [tiles, kblocks, tile_block_bytes(sbits)]
  const void* params;     // [tiles, groups, P, 16] float32 or float16 (params_f16): s (and o if P = 2)
  bool params_f16;
  int64_t pcount;         // P
  float qoff;             // o = s * qoff when P = 1: qmin of an integer format, -bias of a float grid
  float out_scale;        // 1 / the grid's factor (1 for integers)
  const int8_t* xq;       // [m, kblocks * 32] activation codes (0 past k)
  const float* xscale;    // [m, kblocks] activation block scales d
  const float* xoffset;   // [m, groups]: sum over the group's blocks of d * (sum of q)
  const float* bias;      // [n] or nullptr
  const uint8_t* table16; // 4-bit fields of a float grid: the grid value of each code; else nullptr
  float* y;               // [m, n]
  int64_t m, n, kblocks, groups, blocks_per_group;  // blocks_per_group: 0 with half_groups
  bool half_groups;       // groups of 16 values: block b holds groups 2b and 2b + 1
  int sbits;
};

// Kernels, one per instruction set. The SIMD ones exist only on x86-64 (they are compiled for
// their instruction set whatever the build flags; the caller checks the CPU has it).
void run_tiles_portable(const Problem& p, int64_t tile0, int64_t tile1);
#if defined(__x86_64__)
void run_tiles_avx2(const Problem& p, int64_t tile0, int64_t tile1);
void run_tiles_avx512_vnni(const Problem& p, int64_t tile0, int64_t tile1);
#endif

}  // namespace int8_act
}  // namespace alphaquant
