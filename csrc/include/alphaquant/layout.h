// Where things sit in a quantized tensor viewed as [rows, k]: which scale covers an element,
// and how many bytes a run of codes takes in a row's bit stream (bit order: formats.h).
// Host and device code both use these; alphaquant/layout.py is the Python side.
#pragma once

#include <cstdint>

#include "alphaquant/formats.h"

namespace alphaquant {

// Bytes of the first n (0..8) codes of a block of 8 that starts on a multiple of 8 codes.
// n == 8 is spelled out so that the common case folds to the constant `bits`.
AQ_HD constexpr int block_bytes(int n, int bits) { return n == 8 ? bits : (n * bits + 7) / 8; }

// Bytes of a packed row of k codes, ceil(k*bits/8), computed per block of 8 codes so that it
// cannot overflow for any k >= 0 (k*bits could).
AQ_HD constexpr int64_t packed_row_bytes(int64_t k, int bits) {
  return (k / 8) * bits + block_bytes(static_cast<int>(k % 8), bits);
}

// Longest row the ops accept: its length in bits, k*8, still fits in int64.
constexpr int64_t kMaxRowLength = INT64_MAX / 8;

namespace layout_checks {
constexpr bool eight_codes_fill_bits_bytes() {
  for (int b = 1; b <= 8; ++b)
    if (block_bytes(8, b) != b) return false;
  return true;
}
constexpr bool row_bytes_are_ceil_k_bits_over_8() {
  for (int b = 1; b <= 8; ++b)
    for (int64_t k = 0; k <= 64; ++k)
      if (packed_row_bytes(k, b) != (k * b + 7) / 8) return false;
  return true;
}
}  // namespace layout_checks

static_assert(layout_checks::eight_codes_fill_bits_bytes(), "a block of 8 codes of b bits is exactly b bytes");
static_assert(layout_checks::row_bytes_are_ceil_k_bits_over_8(), "a row of k codes takes ceil(k*b/8) bytes");
static_assert(packed_row_bytes(4, 6) == 3 && packed_row_bytes(2, 4) == 1 && packed_row_bytes(4, 2) == 1,
              "formats.h: four 6-bit codes in three bytes, two 4-bit or four 2-bit codes in one");
static_assert(packed_row_bytes(kMaxRowLength, 8) == kMaxRowLength, "the longest row's byte count fits in int64");

// The layout of a quantized tensor viewed as [rows, k] with groups along k. Scales and zero
// points are [rows, groups] row-major, or a single value per tensor.
struct GroupLayout {
  int64_t rows;
  int64_t k;
  int64_t group_size;  // elements per group (>= k means one group per row)
  int64_t groups;      // groups per row
  bool per_tensor;     // one scale for the whole tensor

  // First element of group g and one past its last (the last group of a row may be short).
  AQ_HD int64_t group_begin(int64_t g) const { return g * group_size; }
  AQ_HD int64_t group_end(int64_t g) const { return (g + 1) * group_size < k ? (g + 1) * group_size : k; }
  // Index of the scale (and zero point) of group g of `row`.
  AQ_HD int64_t group_index(int64_t row, int64_t g) const { return per_tensor ? 0 : row * groups + g; }
  // Index of the scale (and zero point) that covers element `col` of `row`.
  AQ_HD int64_t scale_index(int64_t row, int64_t col) const { return group_index(row, col / group_size); }
};

}  // namespace alphaquant
