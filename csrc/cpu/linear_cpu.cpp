// Low-bit linear layer on the CPU: y = x @ dequantize(W).T + bias.
//
// Few rows of x (decode): each thread takes a range of output features, unpacks one weight row
// at a time into L1 and takes its dot products with every row of x, so the packed weight is
// read once and never expanded in memory. Integer groups use
//   sum_i (c_i + qmin - z) s x_i = s * (sum_i c_i x_i + (qmin - z) * sum_i x_i)
// with the group sums of x computed once. Many rows: the weight is dequantized to float32 and
// handed to ATen's GEMM, where compute dominates and the expansion is paid back.
#include "cpu/cpu_variant.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>


#include "alphaquant/arg_checks.h"
#include "alphaquant/bitstream.h"
#include "cpu/decode_table.h"
#include "cpu/cpu_isa.h"
#include "cpu/dot.h"
#include "cpu/linear_bf16_dot.h"
#include "cpu/linear_avx2.h"
#include "cpu/tiled_gemm.h"

namespace alphaquant {
namespace AQ_CPU_VARIANT {  // cpu_variant.h

constexpr int64_t kMaxGemvRows = 16;

// The dtype of the dequantized-tile GEMM: bf16 for bf16 activations when the CPU has AVX-512 BF16
// (checked at run time; ALPHAQUANT_NO_BF16_GEMM=1 turns it off), float32 otherwise.
at::ScalarType gemm_dtype(at::ScalarType activations) {
  static const bool bf16_gemm = [] {
    const char* off = std::getenv("ALPHAQUANT_NO_BF16_GEMM");
    if (off != nullptr && std::string(off) == "1") return false;
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("avx512bf16") != 0;
#else
    return false;
#endif
  }();
  return activations == at::kBFloat16 && bf16_gemm ? at::kBFloat16 : at::kFloat;
}

// Sums of x [m, k] over each group of the weight's layout: [m, groups].
std::vector<float> group_sums(const GroupLayout& l, const float* x, int64_t m) {
  std::vector<float> sums(m * l.groups);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < l.groups; ++g) {
      float s = 0.0f;
      for (int64_t i = l.group_begin(g); i < l.group_end(g); ++i) s += x[r * l.k + i];
      sums[r * l.groups + g] = s;
    }
  return sums;
}

// Each gemv below checks the scales as it reads them and sets `bad_scale` if one is invalid.
template <class CODEC, int BITS>
void gemv_rows(const LinearArgs& a, const float* x, float* y, int64_t m, std::atomic<bool>& bad_scale) {
  const GroupLayout& l = a.layout;
  const int64_t k = l.k, n = l.rows, row_bytes = a.packed.size(1);
  const uint8_t* w = a.packed.data_ptr<uint8_t>();
  const float* zero = a.zero ? a.zero->data_ptr<float>() : nullptr;
  const float* bias = a.bias ? a.bias->data_ptr<float>() : nullptr;
  constexpr bool kInt = std::is_void_v<CODEC>;
  const float qmin = a.fmt.qmin();
  const float* table = kInt ? nullptr : decode_table(a.fmt);
  // Group sums of x, for the integer offset term.
  const std::vector<float> xsum = kInt ? group_sums(l, x, m) : std::vector<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> codes(k);
    std::vector<float> wrow(k);
    float acc[kMaxGemvRows];
    bool bad = false;
    for (int64_t j = begin; j < end; ++j) {
      unpack_run<BITS>(w + j * row_bytes, codes.data(), k);
      if constexpr (kInt) {
        for (int64_t i = 0; i < k; ++i) wrow[i] = static_cast<float>(codes[i]);
      } else {
        for (int64_t i = 0; i < k; ++i) wrow[i] = table[codes[i]];
      }
      for (int64_t r = 0; r < m; ++r) acc[r] = 0.0f;
      for (int64_t g = 0; g < l.groups; ++g) {
        const int64_t g0 = l.group_begin(g), g1 = l.group_end(g);
        const int64_t si = l.group_index(j, g);
        const float s = a.scale_at(si), z = zero ? zero[si] : 0.0f;
        bad |= !valid_scale(s, z);
        const float offset = kInt ? qmin - z : 0.0f;
        for (int64_t r = 0; r < m; ++r) {
          float d = dot(wrow.data() + g0, x + r * k + g0, g1 - g0);
          if constexpr (kInt) d += offset * xsum[r * l.groups + g];
          acc[r] += s * d;
        }
      }
      for (int64_t r = 0; r < m; ++r) y[r * n + j] = acc[r] + (bias ? bias[j] : 0.0f);
    }
    if (bad) bad_scale = true;
  });
}

#if AQ_AVX2
// One output feature j of gemv_rows_avx2 for a float-format weight whose groups are one chunk of
// 8 bytes each: the scales of eight groups are loaded (or, for nvfp4's bytes, gathered from their
// table) and checked as one vector, then broadcast lane by lane.
template <int BITS, int M>
void gemv_row_one_chunk_groups(const LinearArgs& a, const uint8_t* wrow, const float* xp, const float* table,
                               int64_t j, float* yj, int64_t n, bool& bad) {
  const GroupLayout& l = a.layout;
  const int64_t groups = l.groups, k = l.k;
  const float* scale = a.scale_codes ? nullptr : a.scale.data_ptr<float>() + j * groups;
  const uint8_t* code = a.scale_codes ? a.scale_codes->data_ptr<uint8_t>() + j * groups : nullptr;
  const float* bias = a.bias ? a.bias->data_ptr<float>() : nullptr;
  const __m256 zero = _mm256_setzero_ps(), largest = _mm256_set1_ps(kFloatMax);
  __m256 total[M];
  for (int r = 0; r < M; ++r) total[r] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 s8 =
        code ? _mm256_i32gather_ps(a.scale_table.data(),
                                   _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(code + g))), 4)
             : _mm256_loadu_ps(scale + g);
    const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(s8, zero, _CMP_GT_OQ), _mm256_cmp_ps(s8, largest, _CMP_LE_OQ));
    bad |= _mm256_movemask_ps(ok) != 0xFF;
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      __m256 acc[M];
      for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
      dot_chunks<BITS, M, true>(wrow, xp, k, g + i, g + i + 1, acc, table);
      const __m256 si = _mm256_permutevar8x32_ps(s8, _mm256_set1_epi32(i));
      for (int r = 0; r < M; ++r) total[r] = _mm256_fmadd_ps(acc[r], si, total[r]);
    }
  }
  for (; g < groups; ++g) {
    const float s = code ? a.scale_table[code[g]] : scale[g];
    bad |= !valid_scale(s, 0.0f);
    __m256 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
    dot_chunks<BITS, M, true>(wrow, xp, k, g, g + 1, acc, table);
    for (int r = 0; r < M; ++r) total[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(s), total[r]);
  }
  for (int r = 0; r < M; ++r) yj[r * n] = hsum(total[r]) + (bias ? bias[j] : 0.0f);
}

// Weights of 1/2/4/6/8 bits (integers; fp4/fp6/fp8/nf4 through their value table) whose rows and
// groups fill whole chunks (8 bytes; 6 bytes for 6-bit codes).
template <int BITS, int M, bool TABLE, int DECODE = kF16cNone>  // DECODE: an F16cDecode (FP8 or FP6 codes)
void gemv_rows_avx2(const LinearArgs& a, const float* x, float* y, std::atomic<bool>& bad_scale) {
  const GroupLayout& l = a.layout;
  const int64_t k = l.k, n = l.rows, row_bytes = a.packed.size(1), per = BITS == 6 ? 8 : 64 / BITS;
  const uint8_t* w = a.packed.data_ptr<uint8_t>();
  // Scales as float32, or (nvfp4) as E4M3 bytes looked up in a 256-entry table.
  const float* scale = a.scale_codes ? nullptr : a.scale.data_ptr<float>();
  const uint8_t* scale_code = a.scale_codes ? a.scale_codes->data_ptr<uint8_t>() : nullptr;
  const float* scale_table = a.scale_table.data();
  const float* zero = a.zero ? a.zero->data_ptr<float>() : nullptr;
  const float* bias = a.bias ? a.bias->data_ptr<float>() : nullptr;
  const float qmin = a.fmt.qmin();
  const float* table = TABLE ? decode_table(a.fmt) : nullptr;
  const std::vector<float> xp = BITS == 6 ? std::vector<float>(x, x + M * k) : permute_x(x, M, k, BITS);
  const std::vector<float> xsum = group_sums(l, x, M);
  // Float formats whose groups are one chunk each (nvfp4: 16 four-bit codes) take eight groups'
  // scales as one vector: the per-group scalar work (scale load, check, broadcast) is what costs
  // there, not the codes.
  const bool one_chunk_groups = TABLE && BITS != 6 && !l.per_tensor && l.group_size == per;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    bool bad = false;
    for (int64_t j = begin; j < end; ++j) {
      if (one_chunk_groups) {
        gemv_row_one_chunk_groups<BITS, M>(a, w + j * row_bytes, xp.data(), table, j, y + j, n, bad);
        continue;
      }
      // Each group's lanes are scaled and summed into `total` (one horizontal sum per row at the
      // end, not per group: small groups such as nvfp4's 16 values are one chunk each).
      float out[M];
      __m256 total[M];
      for (int r = 0; r < M; ++r) out[r] = bias ? bias[j] : 0.0f, total[r] = _mm256_setzero_ps();
      for (int64_t g = 0; g < l.groups; ++g) {
        const int64_t si = l.group_index(j, g);
        const float s = scale_code ? scale_table[scale_code[si]] : scale[si], z = zero ? zero[si] : 0.0f;
        bad |= !valid_scale(s, z);
        __m256 acc[M];
        for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
        const int64_t c0 = l.group_begin(g) / per, c1 = l.group_end(g) / per;
        if constexpr (BITS == 6) {
          dot_chunks6<M, TABLE, DECODE>(w + j * row_bytes, xp.data(), k, c0, c1, acc, table);
        } else {
          dot_chunks<BITS, M, TABLE, DECODE>(w + j * row_bytes, xp.data(), k, c0, c1, acc, table);
        }
        const __m256 sv = _mm256_set1_ps(s);
        for (int r = 0; r < M; ++r) total[r] = _mm256_fmadd_ps(acc[r], sv, total[r]);
        if constexpr (!TABLE) {
          const float offset = qmin - z;
          for (int r = 0; r < M; ++r) out[r] += s * offset * xsum[r * l.groups + g];
        }
      }
      for (int r = 0; r < M; ++r) y[r * n + j] = out[r] + hsum(total[r]);
    }
    if (bad) bad_scale = true;
  });
}

#if AQ_AVX2
// How F16C decodes this format's codes (linear_avx2.h), or kF16cNone where it does not.
int f16c_decode(const FormatSpec& f) {
  switch (f.id) {
    case FormatId::kFP8E4M3: return kFp8E4M3;
    case FormatId::kFP8E5M2: return kFp8E5M2;
    case FormatId::kFP6E3M2: return kFp6E3M2;
    case FormatId::kFP6E2M3: return kFp6E2M3;
    default: return kF16cNone;
  }
}

// FP8 and FP6 weights (MX or not), decoded by F16C instead of a table gather.
template <int BITS, int DECODE>
void gemv_f16c_rows(const LinearArgs& a, const float* x, float* y, int64_t rows, std::atomic<bool>& bad_scale) {
  switch (rows) {
    case 1: return gemv_rows_avx2<BITS, 1, true, DECODE>(a, x, y, bad_scale);
    case 2: return gemv_rows_avx2<BITS, 2, true, DECODE>(a, x, y, bad_scale);
    case 3: return gemv_rows_avx2<BITS, 3, true, DECODE>(a, x, y, bad_scale);
    default: return gemv_rows_avx2<BITS, 4, true, DECODE>(a, x, y, bad_scale);
  }
}

void gemv_f16c_rows(const LinearArgs& a, const float* x, float* y, int64_t rows, int decode,
                    std::atomic<bool>& bad_scale) {
  switch (decode) {
    case kFp8E4M3: return gemv_f16c_rows<8, kFp8E4M3>(a, x, y, rows, bad_scale);
    case kFp8E5M2: return gemv_f16c_rows<8, kFp8E5M2>(a, x, y, rows, bad_scale);
    case kFp6E3M2: return gemv_f16c_rows<6, kFp6E3M2>(a, x, y, rows, bad_scale);
    default: return gemv_f16c_rows<6, kFp6E2M3>(a, x, y, rows, bad_scale);
  }
}
#endif

bool try_gemv_avx2(const LinearArgs& a, const float* x, float* y, int64_t m, std::atomic<bool>& bad_scale) {
  const int bits = a.fmt.bits;
  if (bits != 1 && bits != 2 && bits != 4 && bits != 6 && bits != 8) return false;
  const int64_t per = bits == 6 ? 8 : 64 / bits;
  if (a.layout.k % per != 0 || (!a.layout.per_tensor && a.layout.group_size % per != 0)) return false;
  bool done = false;
#if AQ_AVX2
  const int decode = f16c_decode(a.fmt);
#endif
  dispatch_bits(bits, [&]<int BITS>() {
    if constexpr (BITS == 1 || BITS == 2 || BITS == 4 || BITS == 6 || BITS == 8) {
      // Rows of x are handled four at a time: enough accumulators to hide FMA latency.
      for (int64_t r0 = 0; r0 < m; r0 += 4) {
        const int64_t rows = std::min<int64_t>(4, m - r0);
        const float* xr = x + r0 * a.layout.k;
        std::vector<float> yr(rows * a.layout.rows);
        const bool table = a.fmt.is_float_or_codebook();
#if AQ_AVX2
        if (decode != kF16cNone) {
          gemv_f16c_rows(a, xr, yr.data(), rows, decode, bad_scale);
          std::copy(yr.begin(), yr.end(), y + r0 * a.layout.rows);
          continue;
        }
#endif
        switch (rows * 2 + table) {
          case 2: gemv_rows_avx2<BITS, 1, false>(a, xr, yr.data(), bad_scale); break;
          case 3: gemv_rows_avx2<BITS, 1, true>(a, xr, yr.data(), bad_scale); break;
          case 4: gemv_rows_avx2<BITS, 2, false>(a, xr, yr.data(), bad_scale); break;
          case 5: gemv_rows_avx2<BITS, 2, true>(a, xr, yr.data(), bad_scale); break;
          case 6: gemv_rows_avx2<BITS, 3, false>(a, xr, yr.data(), bad_scale); break;
          case 7: gemv_rows_avx2<BITS, 3, true>(a, xr, yr.data(), bad_scale); break;
          case 9: gemv_rows_avx2<BITS, 4, true>(a, xr, yr.data(), bad_scale); break;
          default: gemv_rows_avx2<BITS, 4, false>(a, xr, yr.data(), bad_scale); break;
        }
        std::copy(yr.begin(), yr.end(), y + r0 * a.layout.rows);
      }
      done = true;
    }
  });
  return done;
}
#else
bool try_gemv_avx2(const LinearArgs&, const float*, float*, int64_t, std::atomic<bool>&) { return false; }
#endif

// Whether float32 / float16 activations go faster split into bf16 parts (3 / 2 vdpbf16ps per row
// and chunk) than through the float32 path (RESULTS.md, "bf16 activations: vdpbf16ps"): for one
// row, and for up to 9 bf16 rows where the float path decodes slowly (6- and 8-bit codes).
bool split_dot_pays(const FormatSpec& f, at::ScalarType dtype, int64_t m) {
  const int64_t rows = m * (dtype == at::kHalf ? 2 : 3);
  return m == 1 || (f.bits >= 6 && rows <= 9);
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                      const std::optional<at::Tensor>& zero_point, const std::optional<at::Tensor>& bias,
                      const std::string& fmt, bool symmetric, int64_t group_size, int64_t k, bool validate) {
  LinearArgs a = prepare_linear(x, packed, scale, zero_point, bias, fmt, symmetric, group_size, k, validate);
  const int64_t m = a.x2d.size(0);
  if (m > kMaxGemvRows) {
    // Dequantize a tile of output features at a time (it stays in cache) and hand it to GEMM:
    // in bf16 for bf16 activations where the CPU multiplies bf16 natively (what F.linear in bf16
    // does with a bf16 weight), else in float32.
    const at::ScalarType compute = gemm_dtype(x.scalar_type());
    const at::Tensor xc = a.x2d.to(compute);
    at::Tensor y = at::empty({m, a.layout.rows}, xc.options());
    const std::optional<at::Tensor> bias_c = a.bias ? std::optional<at::Tensor>(a.bias->to(compute)) : std::nullopt;
    gemm_by_dequantized_tiles(xc, bias_c, y, [&](int64_t n0, int64_t rows) {
      return dequantize_weight(a, compute, n0, rows);
    });
    return y.to(x.scalar_type()).reshape(a.out_shape);
  }
  std::atomic<bool> bad_scale{false};
  // Exact bf16 products where the CPU has AVX-512 BF16 (linear_bf16_dot.h): bf16 activations as
  // they are, float32 and float16 ones split into bf16 parts where that pays.
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (bf16_dot_usable(chosen_cpu_isa()) && (bf16 || split_dot_pays(a.fmt, x.scalar_type(), m))) {
    at::Tensor y = at::empty({m, a.layout.rows}, a.x2d.options().dtype(at::kFloat));
    const at::Tensor xs = bf16 ? a.x2d : a.x2d.to(at::kFloat).contiguous();
    const bool done = bf16 ? linear_bf16_dot(a, xs.data_ptr<c10::BFloat16>(), y.data_ptr<float>(), m, bad_scale)
                           : linear_split_bf16_dot(a, xs.data_ptr<float>(), x.scalar_type() == at::kHalf ? 2 : 3,
                                                   y.data_ptr<float>(), m, bad_scale);
    if (done) {
      if (a.validate && bad_scale) raise_kernel_error("linear", kErrBadScale, a.fmt);
      return y.to(x.scalar_type()).reshape(a.out_shape);
    }
  }
  const at::Tensor xf = a.x2d.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, a.layout.rows}, xf.options());
  if (!try_gemv_avx2(a, xf.data_ptr<float>(), y.data_ptr<float>(), m, bad_scale)) {
    dispatch_format(a.fmt, [&]<class CODEC, int BITS>() {
      gemv_rows<CODEC, BITS>(a, xf.data_ptr<float>(), y.data_ptr<float>(), m, bad_scale);
    });
  }
  if (a.validate && bad_scale) raise_kernel_error("linear", kErrBadScale, a.fmt);
  return y.to(x.scalar_type()).reshape(a.out_shape);
}

}  // namespace AQ_CPU_VARIANT
}  // namespace alphaquant
