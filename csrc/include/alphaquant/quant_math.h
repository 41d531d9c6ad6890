// Per-element and per-group arithmetic of quantization, shared by the CPU and CUDA kernels and
// mirrored operation for operation by alphaquant/reference.py (so results match bit for bit:
// float32 throughout, true division, no reciprocal tricks).
#pragma once

#include "alphaquant/format_spec.h"
#include "alphaquant/formats.h"

namespace alphaquant {

// Plain comparisons instead of fminf/fmaxf: these inline and vectorize where the libm calls do
// not. A NaN first operand comes back unchanged.
AQ_HD float min_of(float a, float b) { return b < a ? b : a; }
AQ_HD float max_of(float a, float b) { return b > a ? b : a; }

// Running statistics of a group: min, max and whether anything was NaN/Inf.
struct GroupStats {
  float mn = INFINITY;
  float mx = -INFINITY;
  bool nonfinite = false;

  // Branch-free so that CPU loops vectorize: a non-finite value counts as 0 for the range.
  AQ_HD void add(float v) {
    const bool ok = finite(v);
    const float fv = ok ? v : 0.0f;
    mn = min_of(mn, fv);
    mx = max_of(mx, fv);
    nonfinite = nonfinite || !ok;
  }
  AQ_HD void merge(const GroupStats& o) {
    mn = min_of(mn, o.mn);
    mx = max_of(mx, o.mx);
    nonfinite = nonfinite || o.nonfinite;
  }
};

struct ScaleZero {
  float scale;
  float zero;
};

// Scale (and zero point) of a group from its finite min/max:
//   symmetric   scale = max|x| / qmax
//   asymmetric  scale = (max - min) / (qmax - qmin), zero = qmin - min / scale
//   float       scale = max|x| / format max
// A group with no spread (all zeros, or constant for asymmetric) gets scale 1 so that nothing
// divides by zero; for asymmetric the zero point then reproduces the constant exactly.
// When max - min overflows float32 (values of both signs near the float32 limit), the range is
// divided before subtracting: max / (qmax - qmin) - min / (qmax - qmin); int1 (one step) still
// overflows there, and the largest float32 is the closest scale. Then |zero| <= qmax - qmin.
// The scale the kernels use for an MX block (formats.h): X = 2^(floor(log2 amax) - emax),
// clamped to E8M0's range; for mxint8 it includes the element's 2^-6.
AQ_HD float mx_scale(const FormatSpec& f, float amax) {
  const int floor_log2 = static_cast<int>((float_bits(amax) >> 23) & 0xffu) - 127;  // -127 for 0, subnormals
  int e = floor_log2 - f.mx_emax;
  e = e < -kE8M0Bias ? -kE8M0Bias : (e > kE8M0Bias ? kE8M0Bias : e);
  return pow2_wide(f.id == FormatId::kInt ? e - kMxIntShift : e);
}

AQ_HD ScaleZero group_scale(const FormatSpec& f, const GroupStats& s) {
  float mn = s.mn, mx = s.mx;
  if (mn > mx) mn = mx = 0.0f;  // empty or all non-finite: nothing to scale
  if (f.mx) return {mx_scale(f, fmaxf(fabsf(mn), fabsf(mx))), 0.0f};
  if (!f.is_asymmetric_int()) {
    const float amax = fmaxf(fabsf(mn), fabsf(mx));
    float scale = amax / f.qmax();
    if (!(scale > 0.0f) || !finite(scale)) scale = 1.0f;
    return {scale, 0.0f};
  }
  const float steps = f.qmax() - f.qmin();
  const float range = mx - mn;
  float scale = range / steps;
  if (!finite(range)) {
    scale = mx / steps - mn / steps;
    if (!finite(scale)) scale = kFloatMax;
  }
  if (!(scale > 0.0f) || !finite(scale)) scale = 1.0f;
  return {scale, f.qmin() - mn / scale};
}

// What every op requires of a scale and zero point it reads: scale finite and > 0, zero point
// finite. Written as comparisons (NaN fails them) so that checking loops vectorize.
AQ_HD bool valid_scale(float scale, float zero) {
  return scale > 0.0f && scale <= kFloatMax && fabsf(zero) <= kFloatMax;
}

// One value -> code, given its group's scale and zero point. `noise` is only read when
// stochastic rounding is on. `saturate` (MX) clamps to the largest finite value first, which
// only changes e5m2 (the others saturate when they encode; e5m2 rounds overflow to Inf).
template <class FMT>
AQ_HD uint8_t quantize_float_code(float x, float scale, uint32_t noise, bool stochastic, bool saturate = false) {
  float v = x / scale;
  if (saturate) v = min_of(max_of(v, -FMT::max_value()), FMT::max_value());
  return static_cast<uint8_t>(FMT::encode(v, noise, stochastic));
}

AQ_HD uint8_t quantize_int_code(float x, float scale, float zero, float qmin, float qmax,
                                uint32_t noise, bool stochastic) {
  const float v = x / scale + zero;
  float q = stochastic ? floorf(v + uniform01(noise)) : rintf(v);
  q = min_of(max_of(q, qmin), qmax);
  return static_cast<uint8_t>(static_cast<int>(q - qmin));
}

// Saturates to +-float32 max: the top code times a scale computed from a maximum near the float32
// limit can round one step past it. Finite results are unchanged (and NaN stays NaN).
AQ_HD float saturate(float v) { return min_of(max_of(v, -kFloatMax), kFloatMax); }

AQ_HD float dequantize_int_code(uint8_t code, float scale, float zero, float qmin) {
  return saturate((static_cast<float>(code) + qmin - zero) * scale);
}

}  // namespace alphaquant
