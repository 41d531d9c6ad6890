// quantization_error on the CPU: the sums of x^2 and of (x - dequantize(packed))^2 in one pass
// over x and the packed codes, with no decoded copy (the per-layer error of streaming quantization).
#include "cpu/cpu_variant.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "alphaquant/arg_checks.h"
#include "alphaquant/bitstream.h"
#include "cpu/decode_table.h"
#include "cpu/int_block_values.h"
#include "cpu/quantize_avx2.h"
#include "cpu/segments.h"

namespace alphaquant {
namespace AQ_CPU_VARIANT {  // cpu_variant.h

at::Tensor quantization_error_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& zero_point, const std::string& fmt, bool symmetric,
                                  int64_t group_size) {
  const ErrorArgs e = prepare_quantization_error(x, packed, scale, zero_point, fmt, symmetric, group_size);
  const DequantizeArgs& a = e.w;
  const GroupLayout& l = a.layout;
  const uint8_t* src = a.packed.data_ptr<uint8_t>();
  const float* sc = a.scale.data_ptr<float>();
  const float* zp = a.zero ? a.zero->data_ptr<float>() : nullptr;
  const int64_t row_bytes = a.packed.size(-1);
  const int64_t seg = segment_length(l);
  const int64_t per_row = (l.k + seg - 1) / seg;
  std::vector<double> sums(2 * l.rows * per_row, 0.0);  // (signal, noise) of each segment, summed at the end
  std::atomic<bool> bad_scale{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.x.scalar_type(), "quantization_error_cpu", [&] {
    const scalar_t* xs = e.x.data_ptr<scalar_t>();
    dispatch_format(a.fmt, [&]<class CODEC, int BITS>() {
      const float qmin = a.fmt.qmin();
      const float* table = decode_table(a.fmt);
      for_each_segment(l, [&](int64_t row, int64_t k0, int64_t k1) {
        const uint8_t* prow = src + row * row_bytes;
        const scalar_t* xrow = xs + row * l.k;
        // The difference is taken in float32, as dequantize's values are; squares are summed in
        // 8 float32 lanes for at most 512 blocks, then added up in double.
        float sig[8] = {}, err[8] = {};
        double s_sum = 0.0, e_sum = 0.0;
        int blocks = 0;
        const auto flush = [&] {
          for (int i = 0; i < 8; ++i) s_sum += sig[i], e_sum += err[i], sig[i] = err[i] = 0.0f;
          blocks = 0;
        };
        bool bad = false;
        const auto add_block = [&](const scalar_t* xb, const float* v) {
          for (int i = 0; i < 8; ++i) {
            const float xv = static_cast<float>(xb[i]);
            const float d = xv - v[i];
            sig[i] += xv * xv;
            err[i] += d * d;
          }
        };
        // Codes [kb, kb + n) under one scale (s, z), n <= 8, kb a multiple of 8.
        const auto add_tail = [&](int64_t kb, int n, float s, float z) {
          uint8_t c[8];
          load_block<BITS>(prow + kb / 8 * BITS, c, n);
          for (int i = 0; i < n; ++i) {
            const float vi = std::is_void_v<CODEC> ? dequantize_int_code(c[i], s, z, qmin) : table[c[i]] * s;
            const float xv = static_cast<float>(xrow[kb + i]);
            const float d = xv - vi;
            sig[i] += xv * xv;
            err[i] += d * d;
          }
        };
        if (l.per_tensor || l.group_size % 8 == 0 || l.group_size >= l.k) {
          // Groups start on a multiple of 8 codes: one scale lookup per group, whole blocks of 8
          // decoded in registers, a short block only at the end of a row.
          for (int64_t g0 = k0; g0 < k1;) {
            const int64_t g1 = l.per_tensor ? k1 : std::min(k1, (g0 / l.group_size + 1) * l.group_size);
            const int64_t si = l.scale_index(row, g0);
            const float s = sc[si], z = zp ? zp[si] : 0.0f;
            bad |= !valid_scale(s, z);
            int64_t kb = g0;
            const auto decode = [&](int64_t b, float* v) {
              uint8_t c[8];
              if constexpr (std::is_void_v<CODEC>) {
                if constexpr (!kUnpacksInRegisters<BITS>) load_block<BITS>(prow + b / 8 * BITS, c, 8);
                int_block_values<BITS>(prow + b / 8 * BITS, c, qmin, z, s, v);
              } else {
                load_block<BITS>(prow + b / 8 * BITS, c, 8);
                for (int i = 0; i < 8; ++i) v[i] = table[c[i]] * s;
              }
            };
#if AQ_AVX2
            if constexpr (kHaveAvx2Quantize<scalar_t>) {  // the lanes in registers for the whole group
              __m256 vs = _mm256_loadu_ps(sig), ve = _mm256_loadu_ps(err);
              for (; kb + 8 <= g1; kb += 8) {
                if (++blocks == 512) {
                  _mm256_storeu_ps(sig, vs), _mm256_storeu_ps(err, ve);
                  flush();
                  vs = ve = _mm256_setzero_ps();
                }
                alignas(32) float v[8];
                decode(kb, v);
                const __m256 xv = load8(xrow + kb);
                const __m256 d = _mm256_sub_ps(xv, _mm256_load_ps(v));
                vs = _mm256_fmadd_ps(xv, xv, vs);
                ve = _mm256_fmadd_ps(d, d, ve);
              }
              _mm256_storeu_ps(sig, vs), _mm256_storeu_ps(err, ve);
            }
#endif
            for (; kb + 8 <= g1; kb += 8) {
              if (++blocks == 512) flush();
              float v[8];
              decode(kb, v);
              add_block(xrow + kb, v);
            }
            if (kb < g1) {
              if (++blocks == 512) flush();
              add_tail(kb, static_cast<int>(g1 - kb), s, z);
            }
            g0 = g1;
          }
        } else {
          // Group sizes that are not multiples of 8: a block may straddle two groups, so each
          // code looks up its own scale.
          for (int64_t kb = k0; kb < k1; kb += 8) {
            if (++blocks == 512) flush();
            const int n = static_cast<int>(std::min<int64_t>(8, k1 - kb));
            uint8_t c[8];
            load_block<BITS>(prow + kb / 8 * BITS, c, n);
            for (int i = 0; i < n; ++i) {
              const int64_t si = l.scale_index(row, kb + i);
              const float s = sc[si], z = zp ? zp[si] : 0.0f;
              bad |= !valid_scale(s, z);
              const float vi = std::is_void_v<CODEC> ? dequantize_int_code(c[i], s, z, qmin) : table[c[i]] * s;
              const float xv = static_cast<float>(xrow[kb + i]);
              const float d = xv - vi;
              sig[i] += xv * xv;
              err[i] += d * d;
            }
          }
        }
        flush();
        const int64_t at_seg = row * per_row + k0 / seg;
        sums[2 * at_seg] = s_sum;
        sums[2 * at_seg + 1] = e_sum;
        if (bad) bad_scale = true;
      });
    });
  });
  if (a.validate && bad_scale) raise_kernel_error("quantization_error", kErrBadScale, a.fmt);
  double signal = 0.0, noise = 0.0;
  for (size_t i = 0; i < sums.size(); i += 2) signal += sums[i], noise += sums[i + 1];
  return at::tensor({signal, noise}, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace AQ_CPU_VARIANT
}  // namespace alphaquant
