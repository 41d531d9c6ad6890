// Which weight formats the int8-activation path takes, and how: a format qualifies when every
// code's value v is (u - bias) / mult for an unsigned byte u (its "grid value"), so that the
// integer kernel multiplies u with the activation codes and the scale s / mult and offset
// -bias * s / mult (int8_act_layout.h) restore v. Integers: u = the code, bias = -qmin (plus the
// zero point). E2M1 (fp4, mxfp4): u = 2v + 12 in [0, 24]. E2M3 (fp6, mxfp6): u = 8v + 60 in
// [0, 120]. nvfp4 is E2M1. Host code only (the SIMD kernels get the 16-entry table of 4-bit formats).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

#include "alphaquant/format_spec.h"
#include "cpu/decode_table.h"

namespace alphaquant {
namespace int8_act {

struct Grid {
  bool ok = false;
  float mult = 1.0f;                // v = (u - bias) / mult
  float bias = 0.0f;                // float formats only; integers use -qmin and the zero point
  bool identity = true;             // u = the code (integers)
  std::array<uint8_t, 256> u{};     // grid value of each code
};

inline Grid grid_of(const FormatSpec& f) {
  Grid g;
  if (f.id == FormatId::kInt) {  // int1..int8, mxint8
    g.ok = true;
    for (int c = 0; c < 256; ++c) g.u[c] = static_cast<uint8_t>(c);
    return g;
  }
  // nvfp4 is E2M1 too (its scales cover 16 values: half_groups in int8_act_layout.h)
  if (f.id != FormatId::kFP4E2M1 && f.id != FormatId::kFP6E2M3) return g;
  g.mult = f.id == FormatId::kFP4E2M1 ? 2.0f : 8.0f;
  g.bias = g.mult * f.max_value;  // 12 or 60
  g.identity = false;
  const float* values = decode_table(f);
  for (int c = 0; c < (1 << f.bits); ++c) {
    const float u = values[c] * g.mult + g.bias;
    if (!(u >= 0.0f && u <= 255.0f && u == std::nearbyint(u))) return Grid{};  // not on the grid: refuse
    g.u[c] = static_cast<uint8_t>(u);
  }
  g.ok = true;
  return g;
}

}  // namespace int8_act
}  // namespace alphaquant
