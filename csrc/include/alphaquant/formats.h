// The bits of every AlphaQuant format, defined once for the C++ and CUDA kernels.
//
// Integer formats (1..8 bits) store offset-binary codes: code = q - qmin, so every code is an
// unsigned number in [0, 2^b - 1].
//   symmetric  : q in [-2^(b-1), 2^(b-1) - 1], code = q + 2^(b-1)   (int4: q=-8 -> 0x0, q=7 -> 0xF)
//   asymmetric : q in [0, 2^b - 1],            code = q
//
// Floating-point formats (sign | exponent | mantissa, most significant bit first):
//   fp8_e4m3  S EEEE MMM  bias 7,  max 448,   S.1111.111 is NaN, no infinity (torch float8_e4m3fn)
//   fp8_e5m2  S EEEEE MM  bias 15, max 57344, S.11111.00 is Inf, S.11111.xx (xx != 0) is NaN
//   fp6_e3m2  S EEE MM    bias 3,  max 28,    no NaN, no infinity
//   fp6_e2m3  S EE MMM    bias 1,  max 7.5,   no NaN, no infinity
//   fp4_e2m1  S EE M      bias 1,  max 6,     no NaN, no infinity  (values 0 .5 1 1.5 2 3 4 6)
// Exponent field 0 is subnormal: value = mantissa * 2^(1 - bias - mbits).
//
// Code book formats: a code indexes a fixed table of values in [-1, 1] (max 1, no NaN, no
// infinity); see NF4 at the end of this file for its table.
//   nf4       4-bit code c -> value[c], values sorted, value[7] = 0, value[0] = -1, value[15] = 1
//
// Learned code books (lut4): 4-bit codes index 16 float values that are not fixed but fitted to
// each tensor (or each row: an output channel of a weight) and passed to the ops beside the
// codes and the scales (see LearnedCodebook at the end of this file):
//   value = codebook[row or 0][code] * scale[group]
//
// MX block formats (OCP Microscaling v1.0): an element format above plus one shared scale per
// block of 32 consecutive values along a row (the last block of a row may be shorter):
//   mxfp8_e4m3 mxfp8_e5m2 mxfp6_e3m2 mxfp6_e2m3 mxfp4_e2m1   elements as fp8/fp6/fp4 above
//   mxint8     elements int8 q in [-128, 127] (offset-binary codes as int8), value q * 2^-6
// The scale is an E8M0 byte e: X = 2^(e - 127), e in 0..254 (2^-127 .. 2^127), e = 255 is NaN.
//   X = 2^(floor(log2(max|x| of the block)) - emax), emax = 8 (e4m3), 15 (e5m2), 4 (e3m2),
//       2 (e2m3, e2m1), 0 (int8); clamped to 2^-127 .. 2^127 (an all-zero block gets 2^-127)
//   element = x / X rounded to nearest even, saturated to the element's largest finite value
//   value   = element * X
// floor(log2) is read from the float32 exponent field (a subnormal max counts as 2^-127), as
// torchao's FLOOR mode does. Values are 4.25 / 6.25 / 8.25 bits each with their scale byte.
// A block holding NaN or Inf gets the NaN scale 0xFF: every element of it decodes to NaN (the
// spec's rule for NaN; Inf too, which no element format carries through a finite block scale).
//
// NVFP4 (nvfp4): fp4_e2m1 elements, one E4M3 scale byte per block of 16 values along a row (the
// last block may be shorter) and one float32 global scale g per tensor, compressed-tensors' recipe
// (the one vLLM loads); g travels in the ops' zero_point argument (nvfp4 has no zero point):
//   g       = 448 * 6 / max|x| over the tensor (1 if that is not finite), or given
//   s       = e4m3((max|x| of the block / 6) * g), saturated at 448; a zero byte becomes 0.125
//   S       = float(s) / g                      the block's scale in float32 (a division, as
//                                               compressed-tensors does: torchao multiplies by 1/g)
//   element = x / S rounded to nearest even, saturated to +-6;   value = element * S
// Scale bytes are E4M3 codes (fp8_e4m3 above) of positive finite values. 4.5 bits per value.
//
// Packing (every format, every width b): each row is a little-endian bit stream; code i of the
// row sits in bits [i*b, i*b + b), counted from bit 0 of the row's first byte. A row of K codes
// takes ceil(K*b/8) bytes, so rows start on byte boundaries and can be read alone. Eight codes
// always fill exactly b bytes, which is the unit the kernels pack and unpack:
//   b=4  byte j = c[2j] | c[2j+1] << 4
//   b=2  byte j = c[4j] | c[4j+1] << 2 | c[4j+2] << 4 | c[4j+3] << 6
//   b=6  four codes in three bytes:
//        byte 0 = c0      | c1 << 6      bits: [c1.1 c1.0 c0.5 .. c0.0]
//        byte 1 = c1 >> 2 | c2 << 4            [c2.3 .. c2.0 c1.5 .. c1.2]
//        byte 2 = c2 >> 4 | c3 << 2            [c3.5 .. c3.0 c2.5 c2.4]
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define AQ_HD __host__ __device__ __forceinline__
#else
#define AQ_HD inline
#endif

namespace alphaquant {

// What a float format does with values it cannot hold.
enum class Specials : int {
  kNone = 0,     // fp4/fp6: finite only; overflow saturates to +-max (as ml_dtypes does)
  kNanOnly = 1,  // e4m3fn: all-ones is NaN; overflow and Inf saturate to +-448 (as torch does)
  kIeee = 2,     // e5m2: Inf and NaN as in IEEE 754; overflow rounds to Inf (as torch does)
};

AQ_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

AQ_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// Largest finite float32.
constexpr float kFloatMax = 3.402823466e38f;

// NaN and Inf fail this test; written as a comparison so that it vectorizes and means the
// same on host and device.
AQ_HD bool finite(float v) { return fabsf(v) <= kFloatMax; }

// 2^e for the small exponents the formats need, built from bits so it is exact everywhere.
AQ_HD float pow2(int e) { return bits_float(static_cast<uint32_t>(e + 127) << 23); }

// A small float format: EBITS exponent bits, MBITS mantissa bits, and the bias.
template <int EBITS, int MBITS, int BIAS, Specials SPECIALS>
struct Minifloat {
  static constexpr int kExpBits = EBITS;
  static constexpr int kManBits = MBITS;
  static constexpr int kBits = 1 + EBITS + MBITS;
  static constexpr uint32_t kSignBit = 1u << (EBITS + MBITS);
  static constexpr uint32_t kMagMask = kSignBit - 1;
  // Largest finite magnitude code: e4m3fn loses the all-ones code to NaN, e5m2 the top exponent.
  static constexpr uint32_t kMaxMag = SPECIALS == Specials::kNanOnly ? kMagMask - 1
                                      : SPECIALS == Specials::kIeee ? ((kMagMask >> MBITS) << MBITS) - 1
                                                                    : kMagMask;
  static constexpr uint32_t kInfMag = (kMagMask >> MBITS) << MBITS;  // only meaningful for kIeee
  static constexpr uint32_t kNanMag = kMagMask;                        // kNanOnly and kIeee
  static constexpr bool kHasNan = SPECIALS != Specials::kNone;
  static constexpr int kMinNormalExp = 1 - BIAS;

  static AQ_HD float decode(uint32_t code) {
    const uint32_t mag = code & kMagMask;
    const float sign = (code & kSignBit) ? -1.0f : 1.0f;
    const uint32_t e = mag >> MBITS;
    const uint32_t m = mag & ((1u << MBITS) - 1);
    if (SPECIALS == Specials::kNanOnly && mag == kNanMag) return bits_float(0x7fc00000u);
    if (SPECIALS == Specials::kIeee && e == (kMagMask >> MBITS)) {
      return m == 0 ? sign * bits_float(0x7f800000u) : bits_float(0x7fc00000u);
    }
    if (e == 0) return sign * static_cast<float>(m) * pow2(kMinNormalExp - MBITS);
    return sign * (1.0f + static_cast<float>(m) * pow2(-MBITS)) * pow2(static_cast<int>(e) - BIAS);
  }

  static AQ_HD float max_value() { return decode(kMaxMag); }

  // float32 -> code. Round to nearest even when `noise` is 0; stochastic rounding adds
  // `noise` (uniform random bits) below the kept mantissa bits and truncates, which rounds up
  // with probability equal to the discarded fraction.
  static AQ_HD uint32_t encode(float x, uint32_t noise = 0, bool stochastic = false) {
    const uint32_t u = float_bits(x);
    const uint32_t sign = (u >> 31) ? kSignBit : 0u;
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return kHasNan ? (sign | kNanMag) : (sign | kMaxMag);
    if (a == 0x7f800000u) return sign | (SPECIALS == Specials::kIeee ? kInfMag : kMaxMag);
    uint32_t mag;
    if (a >= (static_cast<uint32_t>(kMinNormalExp + 127) << 23)) {
      // Normal in the target: drop 23-MBITS mantissa bits of the float32 encoding.
      constexpr int kDrop = 23 - MBITS;
      constexpr uint32_t kDropMask = (1u << kDrop) - 1;
      uint32_t r;
      if (stochastic) {
        r = a + (noise & kDropMask);
      } else {
        r = a + (kDropMask >> 1) + ((a >> kDrop) & 1u);
      }
      // Rounding can carry into the exponent, which is the correct next binade.
      mag = (r >> kDrop) - (static_cast<uint32_t>(127 - BIAS) << MBITS);
      if (r >= 0x7f800000u) mag = kMagMask + 1;  // overflowed float32 itself: treat as too large
    } else {
      // Subnormal in the target: a multiple of 2^(kMinNormalExp - MBITS). Scaling by a power of
      // two is exact, so rounding the scaled value is rounding the original.
      const float scaled = bits_float(a) * pow2(MBITS - kMinNormalExp);
      float q;
      if (stochastic) {
        q = floorf(scaled + static_cast<float>(noise >> 8) * pow2(-24));
      } else {
        q = rintf(scaled);
      }
      mag = static_cast<uint32_t>(q);  // may be 2^MBITS: the smallest normal, encoded correctly
    }
    if (mag > kMaxMag) mag = SPECIALS == Specials::kIeee ? kInfMag : kMaxMag;
    return sign | mag;
  }
};

using FP8E4M3 = Minifloat<4, 3, 7, Specials::kNanOnly>;
using FP8E5M2 = Minifloat<5, 2, 15, Specials::kIeee>;
using FP6E3M2 = Minifloat<3, 2, 3, Specials::kNone>;
using FP6E2M3 = Minifloat<2, 3, 1, Specials::kNone>;
using FP4E2M1 = Minifloat<2, 1, 1, Specials::kNone>;

// The code widths and largest finite codes of the table above.
static_assert(FP8E4M3::kBits == 8 && FP8E4M3::kMaxMag == 0x7E, "e4m3fn: S.1111.110 is 448, S.1111.111 NaN");
static_assert(FP8E5M2::kBits == 8 && FP8E5M2::kMaxMag == 0x7B && FP8E5M2::kInfMag == 0x7C,
              "e5m2: S.11110.11 is 57344, S.11111.00 Inf");
static_assert(FP6E3M2::kBits == 6 && FP6E3M2::kMaxMag == 0x1F, "e3m2: every code is finite");
static_assert(FP6E2M3::kBits == 6 && FP6E2M3::kMaxMag == 0x1F, "e2m3: every code is finite");
static_assert(FP4E2M1::kBits == 4 && FP4E2M1::kMaxMag == 0x7, "e2m1: every code is finite");

// Integer range of a b-bit format (see the table at the top).
struct IntRange {
  float qmin, qmax;
};

AQ_HD IntRange int_range(int bits, bool symmetric) {
  if (symmetric) {
    return {-static_cast<float>(1 << (bits - 1)), static_cast<float>((1 << (bits - 1)) - 1)};
  }
  return {0.0f, static_cast<float>((1 << bits) - 1)};
}

// One-byte zero points (asymmetric ints): zero points are floats, but may be passed and stored as
// uint8 codes c on a grid of step 2^(b-7) codes, decoded (exactly, in float32) as
//   z = c * 2^(b-7) - 2^(b-1)          c in 0..255, z in [-2^(b-1), 3 * 2^(b-1))
// int4: steps of 1/8 over [-8, 23.875]; int8: steps of 2 over [-128, 382]; int2: 1/32 over [-2, 6).
// Every integer zero point of the code range is on the grid, and so is a range that holds 0.
struct ZeroGrid {
  float step, lowest;
};

inline ZeroGrid zero_grid(int bits) {
  return {std::ldexp(1.0f, bits - 7), -std::ldexp(1.0f, bits - 1)};
}

// 2^e for e in [-149, 127]: normal powers from the exponent field, the rest as float32 subnormals.
AQ_HD float pow2_wide(int e) {
  return e >= -126 ? bits_float(static_cast<uint32_t>(e + 127) << 23) : bits_float(1u << (e + 149));
}

constexpr int kMxBlock = 32;       // values per MX scale
constexpr int kE8M0Bias = 127;     // X = 2^(e - 127)
constexpr int kMxIntShift = 6;     // an mxint8 element q is q * 2^-6
constexpr int kNvfp4Block = 16;    // values per NVFP4 scale byte
constexpr int kNvfp4ScaleOf0 = 0x20;  // E4M3 0.125: the byte of a block whose scale rounds to 0

// Bits of one block with its scale byte: MX 32 * b + 8 (4.25 / 6.25 / 8.25 per value), nvfp4
// 16 * 4 + 8 = 72 (4.5 per value; plus 32 bits per tensor for the global scale).
static_assert(kMxBlock * 4 + 8 == 136 && kNvfp4Block * 4 + 8 == 72, "MX fp4: 4.25 bits per value, nvfp4: 4.5");
static_assert(FP8E4M3::kMaxMag == 0x7E && kNvfp4ScaleOf0 == 0x20, "E4M3: 0x7E is 448, 0x20 is 2^-3 = 0.125");

// Pack eight codes of BITS bits into one integer of 8*BITS bits, which is exactly BITS bytes
// (the unit of the row bit stream; byte lengths: layout.h).
template <int BITS>
AQ_HD uint64_t pack8(const uint8_t* codes) {
  uint64_t v = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(codes[i]) << (i * BITS);
  return v;
}

template <int BITS>
AQ_HD uint8_t unpack1(uint64_t v, int i) {
  return static_cast<uint8_t>((v >> (i * BITS)) & ((1u << BITS) - 1));
}

// Stateless random bits for stochastic rounding: the same (seed, element index) gives the same
// bits on every device and in the pure-PyTorch reference (alphaquant/reference.py).
AQ_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

AQ_HD uint32_t random_bits(uint64_t seed, uint64_t index) {
  const uint32_t key = mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32) +
                                                                 static_cast<uint32_t>(index >> 32)));
  return mix32(static_cast<uint32_t>(index) ^ key);
}

// Uniform in [0, 1) with 24 bits, exact in float32.
AQ_HD float uniform01(uint32_t bits) { return static_cast<float>(bits >> 8) * pow2(-24); }

// NF4 (4-bit NormalFloat, the weight format of QLoRA and bitsandbytes): 16 quantiles of a standard
// normal distribution scaled to [-1, 1], with an exact zero (so padding and zero weights stay 0).
// Codes are plain indices, sorted by value, exactly the float32 values of bitsandbytes:
//
//   code  value                  midpoint to the next      code  value                midpoint
//    0   -1.0                   -0.848096371               8    0.07958029955625534  0.120255247
//    1   -0.6961928009986877    -0.610632896               9    0.16093020141124725  0.203521252
//    2   -0.5250730514526367    -0.45999527               10    0.24611230194568634  0.292013764
//    3   -0.39491748809814453   -0.33967942               11    0.33791524171829224  0.389312536
//    4   -0.28444138169288635   -0.234607399              12    0.44070982933044434  0.501663446
//    5   -0.18477343022823334   -0.137911737              13    0.5626170039176941   0.64278692
//    6   -0.09105003625154495   -0.0455250181             14    0.7229568362236023   0.861478448
//    7    0.0                    0.0397901498             15    1.0
//
// Round to nearest: the code is the number of midpoints (value[i] + value[i+1]) / 2 (float32) that
// x is strictly greater than, so a value exactly on a midpoint takes the lower code, which is the
// rule bitsandbytes applies (its kernels test x > midpoint); beyond +-1 saturates to code 0 / 15.
// Stochastic rounding picks between the neighbours lo <= x < hi, up with probability
// (x - lo) / (hi - lo), from the same 24 random bits as the other formats (uniform01).
struct NF4 {
  static constexpr int kBits = 4;
  static constexpr uint32_t kCodes = 16;

  // A table local to the function (not a namespace-scope array) so that device code may read it.
  static AQ_HD constexpr float value(uint32_t code) {
    constexpr float kValues[kCodes] = {-1.0f,
                                       -0.6961928009986877f,
                                       -0.5250730514526367f,
                                       -0.39491748809814453f,
                                       -0.28444138169288635f,
                                       -0.18477343022823334f,
                                       -0.09105003625154495f,
                                       0.0f,
                                       0.07958029955625534f,
                                       0.16093020141124725f,
                                       0.24611230194568634f,
                                       0.33791524171829224f,
                                       0.44070982933044434f,
                                       0.5626170039176941f,
                                       0.7229568362236023f,
                                       1.0f};
    return kValues[code & (kCodes - 1)];
  }
  static AQ_HD constexpr float midpoint(uint32_t i) { return (value(i) + value(i + 1)) * 0.5f; }

  static AQ_HD float decode(uint32_t code) { return value(code); }
  static AQ_HD float max_value() { return 1.0f; }

  // NaN counts as below every midpoint (code 0); the kernels flag it before it is stored.
  static AQ_HD uint32_t encode(float x, uint32_t noise = 0, bool stochastic = false) {
    uint32_t code = 0;
    if (!stochastic) {
      // 15 comparisons with constants and no branch: vectorizes on the CPU
#pragma unroll
      for (uint32_t i = 0; i + 1 < kCodes; ++i) code += x > midpoint(i) ? 1u : 0u;
      return code;
    }
#pragma unroll
    for (uint32_t i = 1; i < kCodes; ++i) code += x >= value(i) ? 1u : 0u;
    if (code == kCodes - 1) return code;  // x >= 1
    const float lo = value(code), hi = value(code + 1);
    const float frac = (x - lo) / (hi - lo);  // < 0 below -1: stays at code 0
    return code + (uniform01(noise) < frac ? 1u : 0u);
  }
};

namespace codebook_checks {
constexpr bool nf4_table_is_sorted_with_midpoints_between() {
  for (uint32_t i = 0; i + 1 < NF4::kCodes; ++i) {
    if (!(NF4::value(i) < NF4::midpoint(i) && NF4::midpoint(i) < NF4::value(i + 1))) return false;
  }
  return true;
}
}  // namespace codebook_checks

static_assert(NF4::kBits == 4 && NF4::kCodes == (1u << NF4::kBits), "nf4: 16 codes of 4 bits");
static_assert(NF4::value(0) == -1.0f && NF4::value(7) == 0.0f && NF4::value(15) == 1.0f,
              "nf4: -1 at code 0, an exact zero at code 7, +1 (the format's max) at code 15");
static_assert(codebook_checks::nf4_table_is_sorted_with_midpoints_between(),
              "nf4: values strictly increasing, so 'count the midpoints below x' is nearest rounding");

// Learned code books (lut4): a row of k 4-bit codes is packed like every 4-bit format (two codes
// a byte, low nibble first); each code indexes a table of kSize float values, one table per
// tensor ([16]) or one per row ([rows, 16]), and the value is table[code] * scale of its group.
// The tables are data, not part of the format: kernels receive them as float32.
struct LearnedCodebook {
  static constexpr int kBits = 4;
  static constexpr int kSize = 1 << kBits;
};
static_assert(LearnedCodebook::kSize == 16 && LearnedCodebook::kBits == NF4::kBits,
              "lut4: 16 values a table, codes packed like nf4");

}  // namespace alphaquant
