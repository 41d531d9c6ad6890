// int8_act_layout: a packed integer weight [n, k] -> the CPU layout of the int8-activation path
// (int8_act_layout.h): codes regrouped into 16-row tiles, and per tile and group the 16 rows'
// scales s and offsets s * (qmin - z). The plain packed format stays what checkpoints hold; this
// one is built when a layer is loaded for CPU inference. int8_act_unlayout goes back from the
// layout's codes to the packed rows, so that a layer need not keep both.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <vector>

#include "alphaquant/arg_checks.h"
#include "alphaquant/bitstream.h"
#include "cpu/int8_act_grid.h"
#include "cpu/int8_act_layout.h"

namespace alphaquant {
namespace {

using namespace int8_act;

// Codes of one tile (rows [16t, 16t + 16) of n, zero-padded) into its blocks; in byte fields the
// grid values u (the kernels then need no table), in 2- and 4-bit fields the codes themselves.
template <int BITS>
void write_tile_codes(const DequantizeArgs& a, const Grid& grid, int64_t t, int sbits, int64_t kblocks,
                      uint8_t* out) {
  const int64_t n = a.layout.rows, k = a.layout.k, row_bytes = a.packed.size(-1), bb = tile_block_bytes(sbits);
  const int fields = 8 / sbits;
  std::vector<uint8_t> codes(kblocks * kBlock);
  for (int lane = 0; lane < kTileRows; ++lane) {
    const int64_t j = t * kTileRows + lane;
    if (j >= n) break;
    unpack_run<BITS>(a.packed.data_ptr<uint8_t>() + j * row_bytes, codes.data(), k);
    for (int64_t b = 0; b < kblocks; ++b)
      for (int p = 0; p < sbits; ++p)
        for (int s = 0; s < fields; ++s)
          for (int i = 0; i < 4; ++i) {
            const int64_t col = b * kBlock + 4 * (fields * p + s) + i;
            const uint8_t c = col >= k ? 0 : sbits == 8 ? grid.u[codes[col]] : codes[col];
            out[b * bb + p * kWordBytes + 4 * lane + i] |= static_cast<uint8_t>(c << (sbits * s));
          }
  }
}

std::tuple<at::Tensor, at::Tensor> int8_act_layout_cpu(const at::Tensor& packed, const at::Tensor& scale,
                                                       const std::optional<at::Tensor>& zero_point,
                                                       const std::string& fmt, bool symmetric, int64_t group_size,
                                                       int64_t k) {
  const char* op = "int8_act_layout";
  DequantizeArgs a = prepare_dequantize(op, packed, scale, zero_point, fmt, symmetric, group_size, k, true);
  const Grid grid = grid_of(a.fmt);
  TORCH_CHECK_VALUE(grid.ok, "alphaquant.", op, ": the int8-activation path takes weights whose values are an ",
                    "integer grid: int1..int8 (symmetric or not), mxint8, fp4_e2m1, mxfp4_e2m1, nvfp4, fp6_e2m3, mxfp6_e2m3; "
                    "got ", fmt);
  TORCH_CHECK_VALUE(packed.dim() == 2, "alphaquant.", op, ": packed must be a weight [n, row bytes]; got ",
                    packed.dim(), " dimensions");
  const GroupLayout& l = a.layout;
  TORCH_CHECK_VALUE(l.groups == 1 || l.group_size % kBlock == 0 || l.group_size == kHalfBlock, "alphaquant.", op,
                    ": group_size must be a multiple of ", kBlock, " (the activation block), ", kHalfBlock,
                    ", or 0 / -1; got ", group_size);
  const int sbits = storage_bits(a.fmt.bits);
  const int64_t n = l.rows, kblocks = ceil_div(k, kBlock), tiles = ceil_div(n, kTileRows);
  at::Tensor codes = at::zeros({tiles, kblocks, tile_block_bytes(sbits)}, packed.options());
  // Params: s per row and group, and o = s * (qmin - z) where there are zero points (P = 2).
  // float16 scales stay float16 when there is no o (its values need not fit float16).
  const float* sc = a.scale.data_ptr<float>();
  const float* zp = a.zero ? a.zero->data_ptr<float>() : nullptr;
  const int64_t pcount = zp ? 2 : 1;
  const bool f16 = pcount == 1 && scale.scalar_type() == at::kHalf;
  at::Tensor params =
      at::zeros({tiles, l.groups, pcount, kTileRows}, packed.options().dtype(f16 ? at::kHalf : at::kFloat));
  const float qmin = a.fmt.qmin();  // integers only: float grids have no zero points
  std::atomic<bool> bad{false};
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      dispatch_bits(a.fmt.bits, [&]<int BITS>() {
        write_tile_codes<BITS>(a, grid, t, sbits, kblocks, codes.data_ptr<uint8_t>() + t * kblocks * codes.size(2));
      });
      const int64_t p0 = t * l.groups * pcount * kTileRows;
      for (int lane = 0; lane < kTileRows && t * kTileRows + lane < n; ++lane)
        for (int64_t g = 0; g < l.groups; ++g) {
          const int64_t si = l.group_index(t * kTileRows + lane, g), i = p0 + g * pcount * kTileRows + lane;
          const float s = sc[si], z = zp ? zp[si] : 0.0f;
          if (!valid_scale(s, z)) bad = true;
          if (f16) {
            params.data_ptr<at::Half>()[i] = static_cast<at::Half>(s);  // was float16: exact
          } else {
            params.data_ptr<float>()[i] = s;
            if (zp) params.data_ptr<float>()[i + kTileRows] = s * (qmin - z);
          }
        }
    }
  });
  if (bad) raise_kernel_error(op, kErrBadScale, a.fmt);
  return {codes, params};
}

// The packed row j of a tile's codes: each code read from its field (byte fields hold grid values:
// back to the code through `code_of`).
template <int BITS>
void read_tile_codes(const uint8_t* tile, const std::array<uint8_t, 256>& code_of, int64_t t, int sbits,
                     int64_t n, int64_t k, uint8_t* packed, int64_t row_bytes) {
  const int64_t bb = tile_block_bytes(sbits), kblocks = ceil_div(k, kBlock);
  const int fields = 8 / sbits;
  const uint8_t mask = static_cast<uint8_t>((1 << sbits) - 1);
  std::vector<uint8_t> codes(kblocks * kBlock);
  for (int lane = 0; lane < kTileRows; ++lane) {
    const int64_t j = t * kTileRows + lane;
    if (j >= n) break;
    for (int64_t b = 0; b < kblocks; ++b)
      for (int p = 0; p < sbits; ++p)
        for (int s = 0; s < fields; ++s)
          for (int i = 0; i < 4; ++i) {
            const uint8_t field = (tile[b * bb + p * kWordBytes + 4 * lane + i] >> (sbits * s)) & mask;
            codes[b * kBlock + 4 * (fields * p + s) + i] = sbits == 8 ? code_of[field] : field;
          }
    pack_run<BITS>(packed + j * row_bytes, codes.data(), k);
  }
}

at::Tensor int8_act_unlayout_cpu(const at::Tensor& codes, const std::string& fmt, int64_t n, int64_t k) {
  const char* op = "int8_act_unlayout";
  const bool is_int = fmt.rfind("int", 0) == 0 || fmt == "mxint8";
  const FormatSpec spec = parse_format(fmt, /*symmetric=*/!is_int || fmt == "mxint8");
  const Grid grid = grid_of(spec);
  TORCH_CHECK_VALUE(grid.ok, "alphaquant.", op, ": fmt must be a format int8_act_layout takes (int1..int8, mxint8, ",
                    "fp4_e2m1, mxfp4_e2m1, nvfp4, fp6_e2m3, mxfp6_e2m3); got ", fmt);
  TORCH_CHECK_VALUE(n > 0 && k > 0, "alphaquant.", op, ": n and k must be > 0; got n=", n, ", k=", k);
  const int sbits = storage_bits(spec.bits);
  const int64_t kblocks = ceil_div(k, kBlock), tiles = ceil_div(n, kTileRows);
  TORCH_CHECK_VALUE(codes.device().is_cpu(), "alphaquant.", op, ": codes must be on the CPU; got ", codes.device());
  TORCH_CHECK_VALUE(codes.scalar_type() == at::kByte && codes.dim() == 3 && codes.size(0) == tiles &&
                        codes.size(1) == kblocks && codes.size(2) == tile_block_bytes(sbits),
                    "alphaquant.", op, ": codes must be uint8 [", tiles, ", ", kblocks, ", ", tile_block_bytes(sbits),
                    "] (int8_act_layout of a ", fmt, " weight [", n, ", ", k, "]); got ", codes.scalar_type(), " ",
                    codes.sizes());
  // Grid value -> code. A grid value two codes share (E2M3's +0 and -0) goes back to the lower code (+0).
  std::array<uint8_t, 256> code_of{};
  for (int c = (1 << spec.bits) - 1; c >= 0; --c) code_of[grid.u[c]] = static_cast<uint8_t>(c);
  const at::Tensor src = codes.contiguous();
  const int64_t row_bytes = packed_row_bytes(k, spec.bits);
  at::Tensor packed = at::zeros({n, row_bytes}, codes.options());
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      dispatch_bits(spec.bits, [&]<int BITS>() {
        read_tile_codes<BITS>(src.data_ptr<uint8_t>() + t * kblocks * src.size(2), code_of, t, sbits, n, k,
                              packed.data_ptr<uint8_t>(), row_bytes);
      });
  });
  return packed;
}

}  // namespace
}  // namespace alphaquant

TORCH_LIBRARY_IMPL(alphaquant, CPU, m) {
  m.impl("int8_act_layout", &alphaquant::int8_act_layout_cpu);
  m.impl("int8_act_unlayout", &alphaquant::int8_act_unlayout_cpu);
}
