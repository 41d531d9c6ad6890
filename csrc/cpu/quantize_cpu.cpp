// quantize / dequantize / fake_quantize on the CPU. Each segment of a row (segments.h) is
// quantized into a small code buffer that stays in cache, then packed (or dequantized back for
// fake_quantize), so the input is read once and the output written once.
#include "cpu/cpu_variant.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#if AQ_AVX2
#include <immintrin.h>
#endif
#include <vector>

#include "alphaquant/arg_checks.h"
#include "alphaquant/bitstream.h"
#include "alphaquant/quant_math.h"
#include "cpu/decode_table.h"
#include "cpu/int_block_values.h"
#include "cpu/quantize_avx2.h"
#include "cpu/segments.h"
#include "cpu/store_block.h"

namespace alphaquant {
namespace AQ_CPU_VARIANT {  // cpu_variant.h

struct GroupParams {
  const float* static_scale;  // nullptr: compute from the group's min/max
  const float* static_zero;
  float* scale_out;  // where computed scales go (nullptr for fake_quantize with static scales)
  float* zero_out;
};

// Scale and zero point of the group [g0, g1) of `row`, computed or read; flags bad scales.
template <class T>
ScaleZero group_params(const FormatSpec& f, const GroupLayout& l, const GroupParams& p, const T* xrow, int64_t row,
                       int64_t g0, int64_t g1, int& err) {
  const int64_t si = l.scale_index(row, g0);
  if (p.static_scale) {
    const ScaleZero sz{.scale = p.static_scale[si], .zero = p.static_zero ? p.static_zero[si] : 0.0f};
    if (!valid_scale(sz.scale, sz.zero)) err |= kErrBadScale;
    return sz;
  }
  GroupStats s;
  if (kHaveAvx2Quantize<T> && (g1 - g0) % 8 == 0) {
    s = group_stats_avx2(xrow + g0, g1 - g0);
  } else {
    for (int64_t k = g0; k < g1; ++k) {
      const float v = static_cast<float>(xrow[k]);
      const float fv = fabsf(v) <= kFloatMax ? v : 0.0f;
      s.mn = min_of(s.mn, fv);
      s.mx = max_of(s.mx, fv);
    }
  }
  const ScaleZero sz = group_scale(f, s);
  if (p.scale_out) p.scale_out[si] = sz.scale;
  if (p.zero_out) p.zero_out[si] = sz.zero;
  return sz;
}

// Quantizes xrow[g0, g1) into codes[0, g1-g0); returns whether anything was NaN/Inf.
template <class CODEC, bool STOCHASTIC, class T>
bool quantize_group(const FormatSpec& f, const T* xrow, int64_t g0, int64_t g1, ScaleZero sz, uint64_t seed,
                    int64_t flat0, uint8_t* codes) {
  bool bad = false;
  const float qmin = f.qmin(), qmax = f.qmax();
  for (int64_t k = g0; k < g1; ++k) {
    const float v = static_cast<float>(xrow[k]);
    bad |= !(fabsf(v) <= kFloatMax);
    const uint32_t noise = STOCHASTIC ? random_bits(seed, static_cast<uint64_t>(flat0 + k)) : 0u;
    if constexpr (std::is_void_v<CODEC>) {
      codes[k - g0] = quantize_int_code(v, sz.scale, sz.zero, qmin, qmax, noise, STOCHASTIC);
    } else {
      codes[k - g0] = quantize_float_code<CODEC>(v, sz.scale, noise, STOCHASTIC, f.mx);
    }
  }
  return bad;
}

template <class CODEC>
void dequantize_group(const FormatSpec& f, const uint8_t* codes, int64_t n, ScaleZero sz, float* out) {
  if constexpr (std::is_void_v<CODEC>) {
    const float qmin = f.qmin();
    for (int64_t i = 0; i < n; ++i) out[i] = dequantize_int_code(codes[i], sz.scale, sz.zero, qmin);
  } else {
    const float* table = decode_table(f);
    for (int64_t i = 0; i < n; ++i) out[i] = table[codes[i]] * sz.scale;
  }
}

// Runs quantization over every segment: `on_group(row, g0, g1, codes, scale_zero)` sees each
// group's codes, `on_segment(row, k0, k1, codes)` the whole segment's. Shared by quantize
// (packs segments) and fake_quantize (decodes groups).
template <class CODEC, class T, class OnGroup, class OnSegment>
int quantize_segments(const QuantizeArgs& a, const GroupParams& p, bool stochastic, uint64_t seed,
                      OnGroup&& on_group, OnSegment&& on_segment) {
  const GroupLayout& l = a.layout;
  const T* x = a.x.data_ptr<T>();
  std::atomic<int> err{0};
  for_each_segment(l, [&](int64_t row, int64_t k0, int64_t k1) {
    thread_local std::vector<uint8_t> codes;
    codes.resize(k1 - k0);
    const T* xrow = x + row * l.k;
    int local = 0;
    bool bad = false;
    for (int64_t g0 = k0; g0 < k1;) {
      const int64_t g1 = l.per_tensor ? k1 : std::min(k1, (g0 / l.group_size + 1) * l.group_size);
      const ScaleZero sz = group_params(a.fmt, l, p, xrow, row, g0, g1, local);
      uint8_t* c = codes.data() + (g0 - k0);
      if constexpr (std::is_void_v<CODEC> && kHaveAvx2Quantize<T>) {
        if (!stochastic && (g1 - g0) % 8 == 0) {
          bad |= int_codes_avx2(xrow + g0, g1 - g0, sz, a.fmt.qmin(), a.fmt.qmax(), c);
          on_group(row, g0, g1, c, sz);
          g0 = g1;
          continue;
        }
      }
      bad |= stochastic ? quantize_group<CODEC, true>(a.fmt, xrow, g0, g1, sz, seed, row * l.k, c)
                        : quantize_group<CODEC, false>(a.fmt, xrow, g0, g1, sz, seed, row * l.k, c);
      on_group(row, g0, g1, c, sz);
      g0 = g1;
    }
    on_segment(row, k0, k1, codes.data());
    if (bad && !a.fmt.holds_nonfinite()) local |= kErrNonFinite;
    if (local) err |= local;
  });
  return err.load();
}

// Min, max and non-finite flag of a whole tensor in one parallel pass, without temporaries
// (per-tensor dynamic scales).
GroupStats tensor_stats_cpu(const at::Tensor& x) {
  GroupStats total;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tensor_stats_cpu", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    total = at::parallel_reduce(
        0, x.numel(), 32768, GroupStats{},
        [&](int64_t begin, int64_t end, GroupStats acc) {
          // GroupStats::add over 16 independent lanes kept in plain arrays, so the loop vectorizes
          constexpr int kLanes = 16;
          float mn[kLanes], mx[kLanes];
          int bad[kLanes];
          for (int l = 0; l < kLanes; ++l) mn[l] = INFINITY, mx[l] = -INFINITY, bad[l] = 0;
          int64_t i = begin;
          for (; i + kLanes <= end; i += kLanes) {
            for (int l = 0; l < kLanes; ++l) {
              const float v = static_cast<float>(src[i + l]);
              const bool ok = finite(v);
              const float fv = ok ? v : 0.0f;
              mn[l] = min_of(mn[l], fv);
              mx[l] = max_of(mx[l], fv);
              bad[l] |= !ok;
            }
          }
          for (; i < end; ++i) acc.add(static_cast<float>(src[i]));
          for (int l = 0; l < kLanes; ++l) acc.merge({.mn = mn[l], .mx = mx[l], .nonfinite = bad[l] != 0});
          return acc;
        },
        [](GroupStats a, const GroupStats& b) {
          a.merge(b);
          return a;
        });
  });
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x, const std::string& fmt,
                                                             bool symmetric, int64_t group_size,
                                                             const std::optional<at::Tensor>& scale,
                                                             const std::optional<at::Tensor>& zero_point,
                                                             bool stochastic, int64_t seed) {
  QuantizeArgs a = prepare_quantize("quantize", x, fmt, symmetric, group_size, scale, zero_point, &tensor_stats_cpu);
  QuantizeOutputs o = allocate_quantize_outputs(a);
  const int64_t row_bytes = o.packed.size(-1);
  const GroupParams p{.static_scale = a.scale ? a.scale->data_ptr<float>() : nullptr,
                      .static_zero = a.zero ? a.zero->data_ptr<float>() : nullptr,
                      .scale_out = o.scale_dst,
                      .zero_out = o.zero_dst};
  uint8_t* dst = o.packed.data_ptr<uint8_t>();
  int err = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "quantize_cpu", [&] {
    dispatch_format(a.fmt, [&]<class CODEC, int BITS>() {
      err = quantize_segments<CODEC, scalar_t>(
          a, p, stochastic, static_cast<uint64_t>(seed), [](int64_t, int64_t, int64_t, const uint8_t*, ScaleZero) {},
          [&](int64_t row, int64_t k0, int64_t k1, const uint8_t* c) {
            pack_run<BITS>(dst + row * row_bytes + k0 / 8 * BITS, c, k1 - k0);
          });
    });
  });
  if (err && is_mx_nan_block_case(a, err)) return mx_quantize_nan_blocks(a, fmt, group_size, scale, stochastic, seed);
  if (err) raise_kernel_error("quantize", err, a.fmt);
  return {o.packed, returned_scale(a, o.scale), o.zero};
}

at::Tensor fake_quantize_cpu(const at::Tensor& x, const std::string& fmt, bool symmetric, int64_t group_size,
                             const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& zero_point,
                             bool stochastic, int64_t seed) {
  QuantizeArgs a =
      prepare_quantize("fake_quantize", x, fmt, symmetric, group_size, scale, zero_point, &tensor_stats_cpu);
  const GroupLayout& l = a.layout;
  at::Tensor out = at::empty(x.sizes(), x.options());
  const GroupParams p{.static_scale = a.scale ? a.scale->data_ptr<float>() : nullptr,
                      .static_zero = a.zero ? a.zero->data_ptr<float>() : nullptr,
                      .scale_out = nullptr,
                      .zero_out = nullptr};
  int err = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "fake_quantize_cpu", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    dispatch_format(a.fmt, [&]<class CODEC, int BITS>() {
      err = quantize_segments<CODEC, scalar_t>(
          a, p, stochastic, static_cast<uint64_t>(seed),
          [&](int64_t row, int64_t g0, int64_t g1, const uint8_t* c, ScaleZero sz) {
            float buf[256];
            for (int64_t s = g0; s < g1; s += 256) {
              const int64_t n = std::min<int64_t>(256, g1 - s);
              dequantize_group<CODEC>(a.fmt, c + (s - g0), n, sz, buf);
              scalar_t* o = dst + row * l.k + s;
              for (int64_t i = 0; i < n; ++i) o[i] = static_cast<scalar_t>(buf[i]);
            }
          },
          [](int64_t, int64_t, int64_t, const uint8_t*) {});
    });
  });
  if (err && is_mx_nan_block_case(a, err)) {
    return mx_fake_quantize_nan_blocks(a, fmt, group_size, scale, stochastic, seed);
  }
  if (err) raise_kernel_error("fake_quantize", err, a.fmt);
  return out;
}

at::Tensor dequantize_cpu(const at::Tensor& packed, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                          const std::string& fmt, bool symmetric, int64_t group_size, int64_t k,
                          at::ScalarType dtype, bool validate) {
  check_output_dtype("dequantize", dtype);
  DequantizeArgs a =
      prepare_dequantize("dequantize", packed, scale, zero_point, fmt, symmetric, group_size, k, validate);
  const GroupLayout& l = a.layout;
  at::Tensor out = at::empty(a.out_shape, packed.options().dtype(dtype));
  const uint8_t* src = a.packed.data_ptr<uint8_t>();
  const float* sc = a.scale.data_ptr<float>();
  const float* zp = a.zero ? a.zero->data_ptr<float>() : nullptr;
  const int64_t row_bytes = a.packed.size(-1);
  std::atomic<bool> bad_scale{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_cpu", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    dispatch_format(a.fmt, [&]<class CODEC, int BITS>() {
      const float qmin = a.fmt.qmin();
      const float* table = decode_table(a.fmt);
      for_each_segment(l, [&](int64_t row, int64_t k0, int64_t k1) {
        const uint8_t* prow = src + row * row_bytes;
        scalar_t* orow = dst + row * l.k;
        bool bad = false;  // any scale read here invalid: checked as the scales are read, at no extra pass
        // Whole groups of whole blocks (group sizes that are multiples of 8): one scale per group,
        // blocks of 8 codes unpacked in registers and written straight out.
        int64_t kb = k0;
        if (!l.per_tensor && l.group_size % 8 == 0) {
          for (; kb + l.group_size <= k1; kb += l.group_size) {
            const int64_t si = l.scale_index(row, kb);
            const float s = sc[si], z = zp ? zp[si] : 0.0f;
            bad |= !valid_scale(s, z);
            for (int64_t b = kb; b < kb + l.group_size; b += 8) {
              float v[8];
              if constexpr (std::is_void_v<CODEC>) {
                uint8_t c[8];
                if constexpr (!kUnpacksInRegisters<BITS>) load_block<BITS>(prow + b / 8 * BITS, c, 8);
                int_block_values<BITS>(prow + b / 8 * BITS, c, qmin, z, s, v);
              } else {
                uint8_t c[8];
                load_block<BITS>(prow + b / 8 * BITS, c, 8);
                for (int i = 0; i < 8; ++i) v[i] = table[c[i]] * s;
              }
              store_block8(orow + b, v);
            }
          }
        }
        // The rest, a block of 8 codes at a time; a block that straddles two groups (group sizes
        // that are not multiples of 8) looks up each scale.
        for (; kb < k1; kb += 8) {
          const int n = static_cast<int>(std::min<int64_t>(8, k1 - kb));
          uint8_t c[8];
          load_block<BITS>(prow + kb / 8 * BITS, c, n);
          const int64_t si0 = l.scale_index(row, kb), si1 = l.scale_index(row, kb + n - 1);
          float v[8];
          if (n == 8 && si0 == si1) {  // the common case, in fixed-length loops that vectorize
            const float s = sc[si0], z = zp ? zp[si0] : 0.0f;
            bad |= !valid_scale(s, z);
            if constexpr (std::is_void_v<CODEC>) {
              int_block_values<BITS>(prow + kb / 8 * BITS, c, qmin, z, s, v);
            } else {
              for (int i = 0; i < 8; ++i) v[i] = table[c[i]] * s;
            }
            store_block8(orow + kb, v);
            continue;
          }
          for (int i = 0; i < n; ++i) {
            const int64_t si = l.scale_index(row, kb + i);
            const float s = sc[si], z = zp ? zp[si] : 0.0f;
            bad |= !valid_scale(s, z);
            if constexpr (std::is_void_v<CODEC>) v[i] = dequantize_int_code(c[i], s, z, qmin);
            else v[i] = table[c[i]] * s;
          }
          for (int i = 0; i < n; ++i) orow[kb + i] = static_cast<scalar_t>(v[i]);
        }
        if (bad) bad_scale = true;
      });
    });
  });
  if (a.validate && bad_scale) raise_kernel_error("dequantize", kErrBadScale, a.fmt);
  return out;
}

}  // namespace AQ_CPU_VARIANT
}  // namespace alphaquant
