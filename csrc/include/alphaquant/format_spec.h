// A format chosen at run time: which codec, how many bits, and its integer or float range.
// Kernels receive a FormatSpec by value and dispatch to the compile-time codec in formats.h.
#pragma once

#include "alphaquant/formats.h"

namespace alphaquant {

enum class FormatId : int {
  kInt = 0,  // integers of 1..8 bits; `bits` and `symmetric` say which
  kFP8E4M3 = 1,
  kFP8E5M2 = 2,
  kFP6E3M2 = 3,
  kFP6E2M3 = 4,
  kFP4E2M1 = 5,
  kNF4 = 6,  // code book (formats.h: NF4)
};

struct FormatSpec {
  FormatId id;
  int bits;
  bool symmetric;
  float max_value;  // float and code book formats: largest finite value
  // MX (formats.h, "MX block formats"): the element format above, one E8M0 scale per block of
  // kMxBlock values; mx_emax is the exponent of the element's largest power of two.
  bool mx = false;
  int mx_emax = 0;
  // NVFP4 (formats.h, "NVFP4"): fp4_e2m1 elements with E4M3 scale bytes per block of kNvfp4Block
  // values and a float32 global scale, which the arguments decode to float32 block scales.
  bool nvfp4 = false;

  // Float and code book formats: every code has a fixed value (a table lookup on the CPU), the
  // scale is max|x| / max_value and there is no zero point. Integers compute their values.
  AQ_HD bool is_float_or_codebook() const { return id != FormatId::kInt; }
  // The only formats with a zero point: integers on [0, 2^bits - 1].
  AQ_HD bool is_asymmetric_int() const { return !is_float_or_codebook() && !symmetric; }
  // Float formats hold NaN (and e5m2 Inf) themselves; the others reject non-finite input.
  // MX formats do not hold them in their elements: a block holding NaN/Inf gets the NaN scale
  // (csrc/mx_nan_blocks.cpp), which the kernels see as a non-finite input flag first.
  AQ_HD bool holds_nonfinite() const { return !mx && (id == FormatId::kFP8E4M3 || id == FormatId::kFP8E5M2); }
  // MX and NVFP4 share a narrow scale per block; `element()` is their element format alone.
  AQ_HD bool is_block_scaled() const { return mx || nvfp4; }
  AQ_HD FormatSpec element() const {
    FormatSpec e = *this;
    e.mx = false;
    e.nvfp4 = false;
    return e;
  }
  AQ_HD float qmin() const { return is_float_or_codebook() ? -max_value : int_range(bits, symmetric).qmin; }
  AQ_HD float qmax() const { return is_float_or_codebook() ? max_value : int_range(bits, symmetric).qmax; }
};

}  // namespace alphaquant
