// linear_bf16_dot (linear_bf16_dot.h) with AVX-512 BF16: per chunk of 32 codes of a weight row,
// the codes become 32 bf16 values in registers and one `vdpbf16ps` per row of x multiplies them
// with 32 activations, 2 products summed into each of 16 float32 lanes.
//
// Codes of 1, 2, 4 and 6 bits: a broadcast load (1, 2 bits), `vpmovzxwq` (4 bits) or `vpermb`
// (6 bits) places the bits of codes 4q..4q+3 in 64-bit lane q, `vpmultishiftqb` moves each code
// to the low bits of its 16-bit word, and `vpermw` (`vpermi2w` for 64 entries) looks up the bf16
// value, in the codes' own order (LSB-first stream, formats.h): activations are read as they lie. 8-bit codes: integers through float32, FP8
// through the F16C converter (E5M2 is a float16's high byte; E4M3's bits placed as a float16's
// are its value times 2^-8, made up by the output scale).
//
// Compiled for AVX-512 whatever the build flags; called only where bf16_dot_usable() says so.
#include "cpu/linear_bf16_dot.h"

#if defined(__x86_64__) && defined(__GNUC__)
// Library headers first, compiled for the baseline: their inline functions may be shared with
// other files, which must not get an AVX-512 copy.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "alphaquant/quant_math.h"
#include "cpu/decode_table.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16,f16c,fma")
// GCC 12 sees the undefined pass-through operand of some AVX-512 intrinsics (vpmultishiftqb's) as
// an uninitialized variable
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

namespace alphaquant {
namespace bf16_dot {
namespace {

constexpr int kChunk = 32;     // codes per chunk: one vdpbf16ps per row of x
constexpr int kMaxPassRows = 8;  // rows of x per pass: 2 x 8 accumulators, the rest for decoding

// How a chunk's codes become bf16 values.
enum class Decode {
  kTable,  // 1-6 bits: the value of each code in a table of bf16 parts (PARTS of them per code)
  kInt8,   // 8-bit integer codes
  kE4M3,   // FP8 E4M3 (values times 2^-8)
  kE5M2,   // FP8 E5M2
};

inline __m512bh as_bf16(__m512i v) { return (__m512bh)v; }

struct Weights {
  const LinearArgs* a;
  // The weight's tensors as raw pointers (read in the inner loops).
  const uint8_t* packed;
  int64_t row_bytes;
  const float* scale;           // float32 scales, or
  const uint8_t* scale_codes;   // block formats' scale bytes, valued by scale_table
  const float* scale_table;
  const float* zero;
  const float* bias;
  bool integer;
  const c10::BFloat16* x;  // [m, k]
  float* y;                // [m, n]
  int64_t m;
  int64_t pass_rows;  // rows of x per pass over the weight (<= kMaxPassRows)
  std::vector<float> xsum;  // integers: sums of x over each group, [m, groups]
  float qmin;
  float out_scale;  // 256 for E4M3 (decoded as value * 2^-8), else 1
  // kTable: vpermb (6-bit codes) and vpmultishiftqb controls, and the bf16 parts of the 64 code
  // values (1-4 bit codes: repeated every 2^BITS entries).
  __m512i spread, shifts;
  std::array<__m512i, 3> table_low, table_high;  // entries 0..31 and 32..63 of each part
};

// 32 codes of BITS bits (1, 2, 4, 6) at `src` (4 * BITS bytes), one per 16-bit word, in order:
// 64-bit lane q gets the bits of codes 4q..4q+3 and `vpmultishiftqb` moves each code to the low
// bits of its word. Bits above the code are left as they are: the table lookup reads only the
// low 5 bits (6 for 6-bit codes), and the tables of 1-4 bit codes repeat every 2^BITS entries.
template <int BITS>
inline __m512i load_codes(const Weights& w, const uint8_t* src) {
  __m512i lanes;
  if constexpr (BITS == 4) {  // lane q: bits 16q..16q+15 (one 16-bit word each)
    lanes = _mm512_cvtepu16_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  } else if constexpr (BITS == 2) {  // every lane: all 64 bits (a broadcast load: no shuffle)
    int64_t v;
    std::memcpy(&v, src, 8);
    lanes = _mm512_set1_epi64(v);
  } else if constexpr (BITS == 1) {  // every lane: the 32 bits, twice
    int32_t v;
    std::memcpy(&v, src, 4);
    lanes = _mm512_set1_epi32(v);
  } else {  // 6 bits: lane q gets bytes from 3q on (24 bits of codes from bit 24q)
    lanes = _mm512_permutexvar_epi8(w.spread, _mm512_maskz_loadu_epi8(0xFFFFFFull, src));
  }
  return _mm512_multishift_epi64_epi8(w.shifts, lanes);
}

template <int BITS>
inline __m512bh table_part(const Weights& w, __m512i codes, int part) {
  if constexpr (BITS == 6) {
    return as_bf16(_mm512_permutex2var_epi16(w.table_low[part], codes, w.table_high[part]));
  } else {
    return as_bf16(_mm512_permutexvar_epi16(codes, w.table_low[part]));
  }
}

// 32 8-bit codes at `src` as bf16 values.
template <Decode D>
inline __m512bh decode8(const uint8_t* src) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  if constexpr (D == Decode::kInt8) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(b)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(b, 1)));
    return _mm512_cvtne2ps_pbh(hi, lo);
  } else {
    const __m512i word = _mm512_cvtepu8_epi16(b);
    __m512i half;
    if constexpr (D == Decode::kE5M2) {
      half = _mm512_slli_epi16(word, 8);
    } else {
      const __m512i magnitude = _mm512_and_si512(word, _mm512_set1_epi16(0x7f));
      half = _mm512_or_si512(_mm512_slli_epi16(magnitude, 7),
                             _mm512_and_si512(_mm512_slli_epi16(word, 8), _mm512_set1_epi16(-0x8000)));
      const __mmask32 nan = _mm512_cmpeq_epi16_mask(magnitude, _mm512_set1_epi16(0x7f));
      half = _mm512_mask_mov_epi16(half, nan, _mm512_set1_epi16(0x7e00));
    }
    const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(half));
    const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(half, 1));
    return _mm512_cvtne2ps_pbh(hi, lo);
  }
}

// acc[r] += the chunk's products with rows r0.. of x (at column c * 32).
template <int BITS, Decode D, int PARTS, int R>
inline void chunk_dot(const Weights& w, const uint8_t* row, int64_t c, const c10::BFloat16* xr, int64_t k,
                      __m512* acc) {
  const uint8_t* src = row + c * (kChunk / 8) * BITS;
  _mm_prefetch(reinterpret_cast<const char*>(src) + 4096, _MM_HINT_T0);
  __m512bh x[R];
  for (int r = 0; r < R; ++r) x[r] = as_bf16(_mm512_loadu_si512(xr + r * k + c * kChunk));
  if constexpr (D == Decode::kTable) {
    const __m512i codes = load_codes<BITS>(w, src);
    for (int p = 0; p < PARTS; ++p) {
      const __m512bh v = table_part<BITS>(w, codes, p);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], x[r], v);
    }
  } else {
    const __m512bh v = decode8<D>(src);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], x[r], v);
  }
}

// Independent accumulator sets for R rows of x: the latency of vdpbf16ps and of the scale's
// multiply-add is hidden by 4 chains whatever R is (it matters at one or two rows).
constexpr int accumulator_sets(int R) { return R >= 4 ? 1 : (R >= 2 ? 2 : 4); }

// Output features [j0, j1) for rows [r0, r0 + R) of x, groups of whole chunks: the scale of each
// group is read, checked and broadcast as a scalar.
template <int BITS, Decode D, int PARTS, int R>
void rows_pass(const Weights& w, int64_t j0, int64_t j1, int64_t r0, bool& bad) {
  constexpr int S = accumulator_sets(R);
  const GroupLayout& l = w.a->layout;
  const int64_t k = l.k, n = l.rows;
  const c10::BFloat16* xr = w.x + r0 * k;
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = w.packed + j * w.row_bytes;
    float out[R];
    __m512 total[S][R];
    for (int r = 0; r < R; ++r) out[r] = w.bias ? w.bias[j] : 0.0f;
    for (int i = 0; i < S; ++i)
      for (int r = 0; r < R; ++r) total[i][r] = _mm512_setzero_ps();
    // The group's scale, checked; integers add their offset term ((code + qmin - z) * s).
    auto group_scale = [&](int64_t g) {
      const int64_t si = l.group_index(j, g);
      const float s = w.scale_codes ? w.scale_table[w.scale_codes[si]] : w.scale[si];
      const float z = w.zero ? w.zero[si] : 0.0f;
      bad |= !valid_scale(s, z);
      if (w.integer)
        for (int r = 0; r < R; ++r) out[r] += s * (w.qmin - z) * w.xsum[(r0 + r) * l.groups + g];
      return s;
    };
      for (int64_t g = 0; g < l.groups; ++g) {
        const __m512 sv = _mm512_set1_ps(group_scale(g));
        __m512 acc[S][R];
        for (int i = 0; i < S; ++i)
          for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
        const int64_t c0 = l.group_begin(g) / kChunk, c1 = l.group_end(g) / kChunk;
        int64_t c = c0;
        for (; c + S <= c1; c += S)
          for (int i = 0; i < S; ++i) chunk_dot<BITS, D, PARTS, R>(w, row, c + i, xr, k, acc[i]);
        for (; c < c1; ++c) chunk_dot<BITS, D, PARTS, R>(w, row, c, xr, k, acc[0]);
        for (int i = 1; i < S; ++i)
          for (int r = 0; r < R; ++r) acc[0][r] = _mm512_add_ps(acc[0][r], acc[i][r]);
        for (int r = 0; r < R; ++r) total[g % S][r] = _mm512_fmadd_ps(acc[0][r], sv, total[g % S][r]);
    }
    for (int i = 1; i < S; ++i)
      for (int r = 0; r < R; ++r) total[0][r] = _mm512_add_ps(total[0][r], total[i][r]);
    for (int r = 0; r < R; ++r) w.y[(r0 + r) * n + j] = out[r] + _mm512_reduce_add_ps(total[0][r]) * w.out_scale;
  }
}

// The same for groups of 16 or 32 values (GS), one chunk or half of one each: 16 groups' scales
// (and zero points) are read and checked as one vector and each chunk takes its lanes from it, as
// per-group scalar work would cost more than the chunk's own.
template <int BITS, Decode D, int PARTS, int GS, int R>
void rows_pass_small_groups(const Weights& w, int64_t j0, int64_t j1, int64_t r0, bool& bad) {
  constexpr int S = accumulator_sets(R);
  const GroupLayout& l = w.a->layout;
  const int64_t k = l.k, n = l.rows, groups = l.groups;
  const c10::BFloat16* xr = w.x + r0 * k;
  const __m512 positive = _mm512_setzero_ps(), largest = _mm512_set1_ps(kFloatMax);
  // Lanes 0-7 of a chunk's sums cover its first 16 values, lanes 8-15 the next 16.
  const __m512i second_half = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = w.packed + j * w.row_bytes;
    __m512 offset[R], total[S][R];
    for (int r = 0; r < R; ++r) offset[r] = _mm512_setzero_ps();
    for (int i = 0; i < S; ++i)
      for (int r = 0; r < R; ++r) total[i][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const int left = static_cast<int>(std::min<int64_t>(16, groups - g));
      const __mmask16 live = static_cast<__mmask16>((1u << left) - 1u);
      const int64_t si = j * groups + g;
      const __m512 s16 =
          w.scale_codes
              ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live,
                                         _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, w.scale_codes + si)),
                                         w.scale_table, 4)
              : _mm512_maskz_loadu_ps(live, w.scale + si);
      const __m512 z16 = w.zero ? _mm512_maskz_loadu_ps(live, w.zero + si) : _mm512_setzero_ps();
      const __mmask16 ok = _mm512_cmp_ps_mask(s16, positive, _CMP_GT_OQ) & _mm512_cmp_ps_mask(s16, largest, _CMP_LE_OQ) &
                           _mm512_cmp_ps_mask(_mm512_abs_ps(z16), largest, _CMP_LE_OQ);
      bad |= (ok & live) != live;
      if (w.integer) {
        const __m512 off16 = _mm512_mul_ps(s16, _mm512_sub_ps(_mm512_set1_ps(w.qmin), z16));
        for (int r = 0; r < R; ++r)
          offset[r] = _mm512_fmadd_ps(off16, _mm512_maskz_loadu_ps(live, w.xsum.data() + (r0 + r) * groups + g),
                                      offset[r]);
      }
      // Unit u of this block: a group (GS >= 32: its chunks summed, then scaled by its lane of
      // s16) or, for 16-value groups, one chunk holding two groups (lanes 0-7 the first's sums).
      constexpr int64_t kChunksPerUnit = GS == 16 ? 1 : GS / kChunk;
      const int64_t c0 = g * GS / kChunk, units = GS == 16 ? left / 2 : left;
      auto unit = [&](int64_t u, __m512* tot) {
        __m512 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t c = 0; c < kChunksPerUnit; ++c) chunk_dot<BITS, D, PARTS, R>(w, row, c0 + u * kChunksPerUnit + c, xr, k, acc);
        const __m512i lane = GS == 16 ? _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(2 * u)), second_half)
                                      : _mm512_set1_epi32(static_cast<int>(u));
        const __m512 sv = _mm512_permutexvar_ps(lane, s16);
        for (int r = 0; r < R; ++r) tot[r] = _mm512_fmadd_ps(acc[r], sv, tot[r]);
      };
      int64_t u = 0;
      for (; u + S <= units; u += S)
        for (int v = 0; v < S; ++v) unit(u + v, total[v]);
      for (; u < units; ++u) unit(u, total[0]);
    }
    for (int i = 1; i < S; ++i)
      for (int r = 0; r < R; ++r) total[0][r] = _mm512_add_ps(total[0][r], total[i][r]);
    for (int r = 0; r < R; ++r)
      w.y[(r0 + r) * n + j] = (w.bias ? w.bias[j] : 0.0f) + _mm512_reduce_add_ps(offset[r]) +
                              _mm512_reduce_add_ps(total[0][r]) * w.out_scale;
  }
}

template <int BITS, Decode D, int PARTS, int GS>
void run(const Weights& w, std::atomic<bool>& bad_scale) {
  at::parallel_for(0, w.a->layout.rows, 16, [&](int64_t j0, int64_t j1) {
    bool bad = false;
    auto pass = [&]<int R>(int64_t r0) {
      // Groups of several chunks: scaled per group where the rows of x are enough accumulator
      // chains, per chunk (no per-group scalar work) where they are not.
      if constexpr (GS == 0 || (GS > kChunk && R >= 4)) {
        rows_pass<BITS, D, PARTS, R>(w, j0, j1, r0, bad);
      } else {
        rows_pass_small_groups<BITS, D, PARTS, GS, R>(w, j0, j1, r0, bad);
      }
    };
    for (int64_t r0 = 0; r0 < w.m; r0 += w.pass_rows) {
      switch (std::min<int64_t>(w.pass_rows, w.m - r0)) {
        case 1: pass.template operator()<1>(r0); break;
        case 2: pass.template operator()<2>(r0); break;
        case 3: pass.template operator()<3>(r0); break;
        case 4: pass.template operator()<4>(r0); break;
        case 5: pass.template operator()<5>(r0); break;
        case 6: pass.template operator()<6>(r0); break;
        case 7: pass.template operator()<7>(r0); break;
        default: pass.template operator()<8>(r0); break;
      }
    }
    if (bad) bad_scale = true;
  });
}

// small_groups: 16 or 32 (rows_pass_small_groups), or 0 (rows_pass).
template <int BITS, Decode D, int PARTS>
void run_groups(const Weights& w, int small_groups, std::atomic<bool>& bad_scale) {
  switch (small_groups) {
    case 16: return run<BITS, D, PARTS, 16>(w, bad_scale);
    case 32: return run<BITS, D, PARTS, 32>(w, bad_scale);
    case 64: return run<BITS, D, PARTS, 64>(w, bad_scale);
    case 128: return run<BITS, D, PARTS, 128>(w, bad_scale);
    default: return run<BITS, D, PARTS, 0>(w, bad_scale);
  }
}

// The bf16 parts of the value of every code (the code itself for integers): the fewest parts,
// at most 3, whose sum is the value exactly. Returns 0 when 3 do not suffice.
int build_tables(const FormatSpec& f, Weights& w) {
  std::array<std::array<uint16_t, 64>, 3> parts{};
  const float* values = f.is_float_or_codebook() ? decode_table(f) : nullptr;
  if (f.is_float_or_codebook() && values == nullptr) return 0;
  int needed = 1;
  for (int c = 0; c < (1 << f.bits); ++c) {
    const float v = values ? values[c] : static_cast<float>(c);
    float rest = v;
    double sum = 0.0;
    for (int p = 0; p < 3; ++p) {
      const c10::BFloat16 part(rest);
      parts[p][c] = part.x;
      sum += static_cast<float>(part);
      rest -= static_cast<float>(part);
      if (std::isnan(v) || sum == static_cast<double>(v)) {
        needed = std::max(needed, p + 1);
        break;
      }
      if (p == 2) return 0;
    }
  }
  for (int p = 0; p < 3; ++p)  // the lookups read 5 or 6 bits of a word, of which the code is the lowest BITS
    for (int c = 1 << f.bits; c < 64; ++c) parts[p][c] = parts[p][c % (1 << f.bits)];
  for (int p = 0; p < 3; ++p) {
    w.table_low[p] = _mm512_loadu_si512(parts[p].data());
    w.table_high[p] = _mm512_loadu_si512(parts[p].data() + 32);
  }
  return needed;
}

// Controls of load_codes: for word i of lane q (code 4q + i), the bit of its lane where the code starts.
template <int BITS>
void set_code_controls(Weights& w) {
  alignas(64) uint8_t spread[64], shifts[64];
  for (int q = 0; q < 8; ++q) {
    const int bit0 = 4 * q * BITS;  // first bit of codes 4q..4q+3 in the chunk
    for (int b = 0; b < 8; ++b) spread[8 * q + b] = static_cast<uint8_t>(std::min(bit0 / 8 + b, 63));
    for (int i = 0; i < 4; ++i) {
      const int lane_bit0 = BITS == 4 ? 0 : BITS == 6 ? bit0 % 8 : bit0;  // where load_codes put bit0
      shifts[8 * q + 2 * i] = static_cast<uint8_t>(lane_bit0 + i * BITS);
      shifts[8 * q + 2 * i + 1] = 0;
    }
  }
  w.spread = _mm512_load_si512(spread);
  w.shifts = _mm512_load_si512(shifts);
}

template <int BITS, Decode D>
void run_parts(const Weights& w, int parts, int small_groups, std::atomic<bool>& bad_scale) {
  if constexpr (BITS != 4) return run_groups<BITS, D, 1>(w, small_groups, bad_scale);  // parts == 1
  switch (parts) {
    case 1: return run_groups<BITS, D, 1>(w, small_groups, bad_scale);
    case 2: return run_groups<BITS, D, 2>(w, small_groups, bad_scale);
    default: return run_groups<BITS, D, 3>(w, small_groups, bad_scale);
  }
}

}  // namespace
}  // namespace bf16_dot

namespace bf16_dot {
namespace {

// Whether the kernels take this weight: k whole chunks, groups of 16 or whole chunks.
bool takes(const LinearArgs& a) {
  const GroupLayout& l = a.layout;
  if (l.k % kChunk != 0) return false;
  const bool one_group = l.per_tensor || l.groups == 1;
  return one_group || l.group_size == kChunk / 2 || l.group_size % kChunk == 0;
}

// y [m, n] = x [m, k] (bf16) @ W.T + bias (bias: float32 [n] or null), in passes of pass_rows rows.
bool dot(const LinearArgs& a, const c10::BFloat16* x, float* y, int64_t m, int64_t pass_rows, const float* bias,
         std::atomic<bool>& bad_scale) {
  const GroupLayout& l = a.layout;
  const FormatSpec& f = a.fmt;
  const bool one_group = l.per_tensor || l.groups == 1;
  const bool small = !one_group && (l.group_size == 16 || l.group_size == 32 || l.group_size == 64 || l.group_size == 128);
  const int small_groups = small ? static_cast<int>(l.group_size) : 0;
  Weights w{.a = &a,
            .packed = a.packed.data_ptr<uint8_t>(),
            .row_bytes = a.packed.size(1),
            .scale = a.scale_codes ? nullptr : a.scale.data_ptr<float>(),
            .scale_codes = a.scale_codes ? a.scale_codes->data_ptr<uint8_t>() : nullptr,
            .scale_table = a.scale_table.data(),
            .zero = a.zero ? a.zero->data_ptr<float>() : nullptr,
            .bias = bias,
            .integer = !f.is_float_or_codebook(),
            .x = x,
            .y = y,
            .m = m,
            .pass_rows = pass_rows,
            .qmin = f.qmin(),
            .out_scale = 1.0f};
  if (!f.is_float_or_codebook()) {
    w.xsum.assign(m * l.groups, 0.0f);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t g = 0; g < l.groups; ++g) {
        float s = 0.0f;
        for (int64_t i = l.group_begin(g); i < l.group_end(g); ++i) s += static_cast<float>(x[r * l.k + i]);
        w.xsum[r * l.groups + g] = s;
      }
  }
  if (f.bits == 8) {
    if (!f.is_float_or_codebook()) {
      run_groups<8, Decode::kInt8, 1>(w, small_groups, bad_scale);
    } else if (f.id == FormatId::kFP8E4M3) {
      w.out_scale = 256.0f;
      run_groups<8, Decode::kE4M3, 1>(w, small_groups, bad_scale);
    } else if (f.id == FormatId::kFP8E5M2) {
      run_groups<8, Decode::kE5M2, 1>(w, small_groups, bad_scale);
    } else {
      return false;
    }
    return true;
  }
  if (f.bits != 1 && f.bits != 2 && f.bits != 4 && f.bits != 6) return false;
  const int parts = build_tables(f, w);
  if (parts == 0 || (parts > 1 && f.bits != 4)) return false;  // split values: NF4's 4-bit codes only
  switch (f.bits) {
    case 1: set_code_controls<1>(w); run_parts<1, Decode::kTable>(w, parts, small_groups, bad_scale); break;
    case 2: set_code_controls<2>(w); run_parts<2, Decode::kTable>(w, parts, small_groups, bad_scale); break;
    case 4: set_code_controls<4>(w); run_parts<4, Decode::kTable>(w, parts, small_groups, bad_scale); break;
    default: set_code_controls<6>(w); run_parts<6, Decode::kTable>(w, parts, small_groups, bad_scale); break;
  }
  return true;
}

// x [m, k] float32 as `parts` rows of bf16 each (out [m, parts, k]) whose sum is x exactly for
// float16 values (2 parts: 11 significant bits) and float32 ones (3 parts: 24 bits), bar values
// below 2^-110 whose last part is a bf16 subnormal (vdpbf16ps reads those as 0). NaN and Inf
// stay in the first part, the others 0.
void split_rows(const float* x, int64_t count, int parts, c10::BFloat16* out, int64_t k) {
  const __m512 infinity = _mm512_set1_ps(INFINITY);
  for (int64_t r = 0; r < count / k; ++r)
    for (int64_t i = 0; i < k; i += 16) {
      __m512 rest = _mm512_loadu_ps(x + r * k + i);
      const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(rest), infinity, _CMP_LT_OQ);
      for (int p = 0; p < parts; ++p) {
        const __m256bh part = _mm512_cvtneps_pbh(rest);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (r * parts + p) * k + i), (__m256i)part);
        // exact: the part is rest rounded to 8 significant bits
        rest = _mm512_maskz_sub_ps(finite, rest, _mm512_cvtpbh_ps(part));
      }
    }
}

}  // namespace
}  // namespace bf16_dot

bool linear_bf16_dot(const LinearArgs& a, const c10::BFloat16* x, float* y, int64_t m,
                     std::atomic<bool>& bad_scale) {
  if (m < 1 || m > kBf16DotMaxRows || !bf16_dot::takes(a)) return false;
  return bf16_dot::dot(a, x, y, m, bf16_dot::kMaxPassRows, a.bias ? a.bias->data_ptr<float>() : nullptr, bad_scale);
}

bool linear_split_bf16_dot(const LinearArgs& a, const float* x, int parts, float* y, int64_t m,
                           std::atomic<bool>& bad_scale) {
  using namespace bf16_dot;
  if (m < 1 || m > kBf16DotMaxRows || !takes(a)) return false;
  const int64_t k = a.layout.k, n = a.layout.rows;
  std::vector<c10::BFloat16> xs(m * parts * k);
  split_rows(x, m * k, parts, xs.data(), k);
  std::vector<float> ys(m * parts * n);
  // passes of whole rows of x (all their parts): 6 rows of bf16 per pass for 2 or 3 parts
  if (!dot(a, xs.data(), ys.data(), m * parts, 6, nullptr, bad_scale)) return false;
  const float* bias = a.bias ? a.bias->data_ptr<float>() : nullptr;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < n; ++j) {
      float v = bias ? bias[j] : 0.0f;
      for (int p = 0; p < parts; ++p) v += ys[(r * parts + p) * n + j];
      y[r * n + j] = v;
    }
  return true;
}

}  // namespace alphaquant

#else
namespace alphaquant {
bool linear_bf16_dot(const LinearArgs&, const c10::BFloat16*, float*, int64_t, std::atomic<bool>&) { return false; }
bool linear_split_bf16_dot(const LinearArgs&, const float*, int, float*, int64_t, std::atomic<bool>&) { return false; }
}  // namespace alphaquant
#endif
