// bf16 activations times a packed weight with AVX-512 BF16 dot products (`vdpbf16ps`), for few
// rows of x (decode). Each chunk of 32 codes is decoded in registers to the bf16 value of its
// codes (the integer code, or the float format's value: exact in bf16 for every format this
// takes, NF4's split into two bf16 parts), so every product is exact and sums in float32 as the
// float path's do; the group's scale multiplies the float32 sum.
#pragma once

#include <c10/util/BFloat16.h>

#include <atomic>
#include <cstdint>

#include "alphaquant/arg_checks.h"
#include "cpu/cpu_isa.h"

namespace alphaquant {

// Rows of x one call takes; more rows are split into calls of this many.
constexpr int64_t kBf16DotMaxRows = 16;

// Called where bf16_dot_usable(chosen_cpu_isa()) (cpu_isa.h).
// y [m, n] float32 = x [m, k] bf16 @ dequantize(W).T + bias, m <= kBf16DotMaxRows. Returns false,
// writing nothing, for weights it does not take: widths other than 1/2/4/6/8 bits, k not a multiple
// of 32, groups that are not whole chunks of 32 (or pairs of 16-value groups), code book formats.
// Sets `bad_scale` when a scale (or zero point) is invalid.
bool linear_bf16_dot(const LinearArgs& a, const c10::BFloat16* x, float* y, int64_t m,
                     std::atomic<bool>& bad_scale);

// The same for float32 or float16 activations (x [m, k] float32, float16 values when parts == 2):
// each row is split into `parts` rows of bf16 that sum to it exactly (3 for float32, 2 for
// float16), multiplied as above and summed, so the products stay exact.
bool linear_split_bf16_dot(const LinearArgs& a, const float* x, int parts, float* y, int64_t m,
                           std::atomic<bool>& bad_scale);

}  // namespace alphaquant
