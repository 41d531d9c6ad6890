// Host-side helpers shared by the CPU and CUDA launchers: parsing format names, checking
// arguments, and turning a run-time format into a compile-time codec.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "alphaquant/format_spec.h"

namespace alphaquant {

// "int1".."int8", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1".
FormatSpec parse_format(const std::string& name, bool symmetric);

// The layout of a quantized tensor viewed as [rows, k] with groups along k.
struct GroupLayout {
  int64_t rows;
  int64_t k;
  int64_t group_size;  // elements per group (>= k means one group per row)
  int64_t groups;      // groups per row
  bool per_tensor;     // one scale for the whole tensor
};

// group_size > 0: groups along the last dim; 0: one group per row (per-channel); -1: per-tensor.
GroupLayout make_layout(at::IntArrayRef shape, int64_t group_size);

// Shape of the scale (and zero point) tensor for an input of `shape`.
std::vector<int64_t> scale_shape(at::IntArrayRef shape, const GroupLayout& layout);

// Calls fn.template operator()<CODEC, BITS>() for the format: CODEC is a Minifloat for float
// formats and void for integers, BITS the code width.
template <class Fn>
void dispatch_format(const FormatSpec& f, Fn&& fn);

}  // namespace alphaquant

#include "alphaquant/dispatch_impl.h"
