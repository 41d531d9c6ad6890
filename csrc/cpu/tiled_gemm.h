// Large batches: dequantize a tile of output features at a time (it stays in cache) and hand it
// to GEMM. Shared by the linear ops of every format; `dequantize_rows(n0, rows)` returns the weight
// rows [rows, k] starting at output feature n0, in x's dtype.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

namespace alphaquant {

// xf: [m, k] float32 or bf16; y: [m, n] of its dtype (written); bias: [n] of its dtype, or none.
template <class DequantizeRows>
void gemm_by_dequantized_tiles(const at::Tensor& xf, const std::optional<at::Tensor>& bias, at::Tensor& y,
                               DequantizeRows dequantize_rows) {
  constexpr int64_t kTile = 1024;  // 16 MiB of float32 at k = 4096: measured best of 256, 1024, all
  const int64_t n = y.size(1);
  for (int64_t n0 = 0; n0 < n; n0 += kTile) {
    const int64_t rows = std::min(kTile, n - n0);
    const at::Tensor w = dequantize_rows(n0, rows);
    at::Tensor yt = y.narrow(1, n0, rows);
    if (bias) {
      yt.copy_(at::addmm(bias->narrow(0, n0, rows), xf, w.t()));
    } else {
      yt.copy_(at::mm(xf, w.t()));
    }
  }
}

}  // namespace alphaquant
