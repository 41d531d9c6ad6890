// Learned code books (lut4, formats.h: LearnedCodebook) on the CPU: dequantize_codebook and
// linear_codebook. value = table[code] * scale, where the 16-entry table belongs to the tensor or
// to the row.
//
// The code book is an argument, not a compiled-in format, so there is no static value table as
// for nf4: each call converts the code book once to float32 ([16] or [n, 16], a 64-byte table a
// row, 1/32 of a packed 4-bit row at k = 4096) and the kernels look codes up in their row's
// table, which stays in L1 while the row is processed. The linear op is otherwise the one of
// linear_cpu.cpp: few rows of x take dot products with each weight row unpacked into L1 (AVX2:
// codes looked up in the row's table held in two registers), many rows dequantize a tile and
// call GEMM.
#include "cpu/cpu_variant.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "alphaquant/arg_checks.h"
#include "alphaquant/bitstream.h"
#include "cpu/dot.h"
#include "cpu/linear_avx2.h"
#include "cpu/segments.h"
#include "cpu/tiled_gemm.h"

namespace alphaquant {
namespace AQ_CPU_VARIANT {  // cpu_variant.h

constexpr int kBits = LearnedCodebook::kBits;
constexpr int kSize = LearnedCodebook::kSize;
constexpr int64_t kMaxGemvRows = 16;

bool table_finite(const float* table) {
  bool ok = true;
  for (int c = 0; c < kSize; ++c) ok &= finite(table[c]);
  return ok;
}

// packed: [..., ceil(k/2)] uint8, scale: [..., groups] (or all ones), codebook: [16] or [..., 16].
at::Tensor dequantize_codebook_cpu(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& codebook,
                                   int64_t group_size, int64_t k, at::ScalarType dtype, bool validate) {
  check_output_dtype("dequantize_codebook", dtype);
  const CodebookArgs a = prepare_dequantize_codebook("dequantize_codebook", packed, scale, codebook, group_size, k,
                                                     validate);
  const GroupLayout& l = a.layout;
  at::Tensor out = at::empty(a.out_shape, packed.options().dtype(dtype));
  const uint8_t* src = a.packed.data_ptr<uint8_t>();
  const float* sc = a.scale.data_ptr<float>();
  const int64_t row_bytes = a.packed.size(-1);
  std::atomic<int> err{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_codebook_cpu", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    for_each_segment(l, [&](int64_t row, int64_t k0, int64_t k1) {
      const float* table = a.table(row);
      const uint8_t* prow = src + row * row_bytes;
      scalar_t* orow = dst + row * l.k;
      int local = table_finite(table) ? 0 : kErrBadCodebook;
      bool bad = false;
      for (int64_t kb = k0; kb < k1; kb += 8) {
        const int n = static_cast<int>(std::min<int64_t>(8, k1 - kb));
        uint8_t c[8];
        load_block<kBits>(prow + kb / 8 * kBits, c, n);
        float v[8];
        const int64_t si0 = l.scale_index(row, kb);
        if (n == 8 && si0 == l.scale_index(row, kb + 7)) {  // one scale: fixed-length loops that vectorize
          const float s = sc[si0];
          bad |= !valid_scale(s, 0.0f);
          for (int i = 0; i < 8; ++i) v[i] = table[c[i]] * s;
          for (int i = 0; i < 8; ++i) orow[kb + i] = static_cast<scalar_t>(v[i]);
          continue;
        }
        for (int i = 0; i < n; ++i) {
          const float s = sc[l.scale_index(row, kb + i)];
          bad |= !valid_scale(s, 0.0f);
          v[i] = table[c[i]] * s;
        }
        for (int i = 0; i < n; ++i) orow[kb + i] = static_cast<scalar_t>(v[i]);
      }
      if (bad) local |= kErrBadScale;
      if (local) err |= local;
    });
  });
  if (validate && err) raise_codebook_error("dequantize_codebook", err);
  return out;
}

// y [m, n] = x [m, k] @ W.T + bias for m <= kMaxGemvRows: each weight row is unpacked and looked
// up in its table once, then dotted with every row of x, group by group.
void gemv_codebook(const CodebookLinearArgs& a, const float* x, float* y, int64_t m, std::atomic<int>& err) {
  const GroupLayout& l = a.w.layout;
  const int64_t k = l.k, n = l.rows, row_bytes = a.w.packed.size(1);
  const uint8_t* w = a.w.packed.data_ptr<uint8_t>();
  const float* scale = a.w.scale.data_ptr<float>();
  const float* bias = a.bias ? a.bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> codes(k);
    std::vector<float> wrow(k);
    float acc[kMaxGemvRows];
    int local = 0;
    for (int64_t j = begin; j < end; ++j) {
      const float* table = a.w.table(j);
      if (!table_finite(table)) local |= kErrBadCodebook;
      unpack_run<kBits>(w + j * row_bytes, codes.data(), k);
      for (int64_t i = 0; i < k; ++i) wrow[i] = table[codes[i]];
      for (int64_t r = 0; r < m; ++r) acc[r] = 0.0f;
      for (int64_t g = 0; g < l.groups; ++g) {
        const int64_t g0 = l.group_begin(g), g1 = l.group_end(g);
        const float s = scale[l.group_index(j, g)];
        if (!valid_scale(s, 0.0f)) local |= kErrBadScale;
        for (int64_t r = 0; r < m; ++r) acc[r] += s * dot(wrow.data() + g0, x + r * k + g0, g1 - g0);
      }
      for (int64_t r = 0; r < m; ++r) y[r * n + j] = acc[r] + (bias ? bias[j] : 0.0f);
    }
    if (local) err |= local;
  });
}

#if AQ_AVX2
// The same with the AVX2 inner loop of linear_avx2.h (the row's table in two registers) for
// M rows of x at a time, when rows and groups fill whole 8-byte chunks (16 codes).
template <int M>
void gemv_codebook_avx2(const CodebookLinearArgs& a, const float* x, float* y, std::atomic<int>& err) {
  const GroupLayout& l = a.w.layout;
  const int64_t k = l.k, n = l.rows, row_bytes = a.w.packed.size(1), per = chunk_codes(kBits);
  const uint8_t* w = a.w.packed.data_ptr<uint8_t>();
  const float* scale = a.w.scale.data_ptr<float>();
  const float* bias = a.bias ? a.bias->data_ptr<float>() : nullptr;
  const std::vector<float> xp = permute_x(x, M, k, kBits);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    int local = 0;
    for (int64_t j = begin; j < end; ++j) {
      const float* table = a.w.table(j);
      if (!table_finite(table)) local |= kErrBadCodebook;
      float out[M];
      for (int r = 0; r < M; ++r) out[r] = bias ? bias[j] : 0.0f;
      for (int64_t g = 0; g < l.groups; ++g) {
        const float s = scale[l.group_index(j, g)];
        if (!valid_scale(s, 0.0f)) local |= kErrBadScale;
        __m256 acc[M];
        for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
        dot_chunks<kBits, M, true>(w + j * row_bytes, xp.data(), k, l.group_begin(g) / per, l.group_end(g) / per, acc,
                                   table);
        for (int r = 0; r < M; ++r) out[r] += s * hsum(acc[r]);
      }
      for (int r = 0; r < M; ++r) y[r * n + j] = out[r];
    }
    if (local) err |= local;
  });
}

bool try_gemv_codebook_avx2(const CodebookLinearArgs& a, const float* x, float* y, int64_t m, std::atomic<int>& err) {
  const GroupLayout& l = a.w.layout;
  const int64_t per = chunk_codes(kBits);
  if (l.k % per != 0 || (!l.per_tensor && l.group_size % per != 0)) return false;
  // Rows of x four at a time: enough accumulators to hide FMA latency (as linear_cpu.cpp).
  for (int64_t r0 = 0; r0 < m; r0 += 4) {
    const int64_t rows = std::min<int64_t>(4, m - r0);
    std::vector<float> yr(rows * l.rows);
    const float* xr = x + r0 * l.k;
    switch (rows) {
      case 1: gemv_codebook_avx2<1>(a, xr, yr.data(), err); break;
      case 2: gemv_codebook_avx2<2>(a, xr, yr.data(), err); break;
      case 3: gemv_codebook_avx2<3>(a, xr, yr.data(), err); break;
      default: gemv_codebook_avx2<4>(a, xr, yr.data(), err); break;
    }
    std::copy(yr.begin(), yr.end(), y + r0 * l.rows);
  }
  return true;
}
#else
bool try_gemv_codebook_avx2(const CodebookLinearArgs&, const float*, float*, int64_t, std::atomic<int>&) {
  return false;
}
#endif

at::Tensor linear_codebook_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               const at::Tensor& codebook, const std::optional<at::Tensor>& bias, int64_t group_size,
                               int64_t k, bool validate) {
  const CodebookLinearArgs a = prepare_linear_codebook(x, packed, scale, codebook, bias, group_size, k, validate);
  const int64_t m = a.x2d.size(0), n = a.w.layout.rows;
  const at::Tensor xf = a.x2d.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, n}, xf.options());
  if (m > kMaxGemvRows) {
    // A tile of output features at a time is dequantized (it stays in cache) and handed to GEMM;
    // the dequantize op checks the scales and the code book when validating.
    gemm_by_dequantized_tiles(xf, a.bias, y, [&](int64_t n0, int64_t rows) {
      return dequantize_codebook_weight(a, at::kFloat, n0, rows);
    });
    return y.to(x.scalar_type()).reshape(a.out_shape);
  }
  std::atomic<int> err{0};
  if (!try_gemv_codebook_avx2(a, xf.data_ptr<float>(), y.data_ptr<float>(), m, err)) {
    gemv_codebook(a, xf.data_ptr<float>(), y.data_ptr<float>(), m, err);
  }
  if (validate && err) raise_codebook_error("linear_codebook", err);
  return y.to(x.scalar_type()).reshape(a.out_shape);
}

}  // namespace AQ_CPU_VARIANT
}  // namespace alphaquant
