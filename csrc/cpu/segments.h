// How the CPU kernels split a [rows, k] tensor into independent pieces of work: segments of a
// row that start on a group boundary and on a multiple of 8 codes (so packed bytes never
// straddle two segments).
#pragma once

#include <ATen/Parallel.h>

#include <numeric>

#include "alphaquant/layout.h"

namespace alphaquant {

inline int64_t segment_length(const GroupLayout& l) {
  if (!l.per_tensor && l.group_size >= l.k) return l.k;  // per-channel: one segment per row
  const int64_t g = l.per_tensor ? 8 : l.group_size;
  const int64_t base = std::lcm(g, int64_t{8});
  return std::min<int64_t>(base * std::max<int64_t>(1, 4096 / base), ((l.k + 7) / 8) * 8);
}

// Calls fn(row, k0, k1) for every segment, in parallel.
template <class Fn>
void for_each_segment(const GroupLayout& l, Fn&& fn) {
  const int64_t seg = segment_length(l);
  const int64_t per_row = (l.k + seg - 1) / seg;
  at::parallel_for(0, l.rows * per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / per_row;
      const int64_t k0 = (i % per_row) * seg;
      fn(row, k0, std::min(k0 + seg, l.k));
    }
  });
}

}  // namespace alphaquant
