// Reading an op's format and layout arguments (host code): format names -> FormatSpec, and
// (shape, group_size) -> GroupLayout. Both devices and every op go through these.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "alphaquant/format_spec.h"
#include "alphaquant/layout.h"

namespace alphaquant {

// "int1".."int8", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "nf4".
FormatSpec parse_format(const std::string& name, bool symmetric);
std::string format_name(const FormatSpec& fmt);

// group_size > 0: groups along the last dim; 0: one group per row (per-channel); -1: per-tensor.
GroupLayout make_layout(at::IntArrayRef shape, int64_t group_size);

// Shape of the scale (and zero point) tensor for an input of `shape`.
std::vector<int64_t> scale_shape(at::IntArrayRef shape, const GroupLayout& layout);

// "input shape [4, 96] with group_size=32", for messages about scale shapes.
std::string layout_context(at::IntArrayRef shape, int64_t group_size);

}  // namespace alphaquant
