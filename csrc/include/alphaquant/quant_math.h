// Per-element and per-group arithmetic of quantization, shared by the CPU and CUDA kernels and
// mirrored operation for operation by alphaquant/reference.py (so results match bit for bit:
// float32 throughout, true division, no reciprocal tricks).
#pragma once

#include "alphaquant/format_spec.h"
#include "alphaquant/formats.h"

namespace alphaquant {

// Plain comparisons instead of fminf/fmaxf: the operands are never NaN here, and these inline
// and vectorize where the libm calls do not.
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

// Scale (and zero point) of a group from its finite min/max, as the seed defines them:
//   symmetric   scale = max|x| / qmax
//   asymmetric  scale = (max - min) / (qmax - qmin), zero = qmin - min / scale
//   float       scale = max|x| / format max
// A group with no spread (all zeros, or constant for asymmetric) gets scale 1 so that nothing
// divides by zero; for asymmetric the zero point then reproduces the constant exactly.
AQ_HD ScaleZero group_scale(const FormatSpec& f, const GroupStats& s) {
  float mn = s.mn, mx = s.mx;
  if (mn > mx) mn = mx = 0.0f;  // empty or all non-finite: nothing to scale
  if (f.is_float() || f.symmetric) {
    const float amax = fmaxf(fabsf(mn), fabsf(mx));
    float scale = amax / f.qmax();
    if (!(scale > 0.0f) || !finite(scale)) scale = 1.0f;
    return {scale, 0.0f};
  }
  float scale = (mx - mn) / (f.qmax() - f.qmin());
  if (!(scale > 0.0f) || !finite(scale)) scale = 1.0f;
  return {scale, f.qmin() - mn / scale};
}

// One value -> code, given its group's scale and zero point. `noise` is only read when
// stochastic rounding is on.
template <class FMT>
AQ_HD uint8_t quantize_float_code(float x, float scale, uint32_t noise, bool stochastic) {
  return static_cast<uint8_t>(FMT::encode(x / scale, noise, stochastic));
}

AQ_HD uint8_t quantize_int_code(float x, float scale, float zero, float qmin, float qmax,
                                uint32_t noise, bool stochastic) {
  const float v = x / scale + zero;
  float q = stochastic ? floorf(v + uniform01(noise)) : rintf(v);
  q = min_of(max_of(q, qmin), qmax);
  return static_cast<uint8_t>(static_cast<int>(q - qmin));
}

AQ_HD float dequantize_int_code(uint8_t code, float scale, float zero, float qmin) {
  return (static_cast<float>(code) + qmin - zero) * scale;
}

}  // namespace alphaquant
