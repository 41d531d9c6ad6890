// What the int8-activation kernels of every instruction set share (int8_act_kernel_*.cpp): the
// walk over the rows of x in passes of at most ROWS, and the choice of a kernel by the layout's
// field width. Templates only, instantiated with each kernel file's own (file-local) lambdas, so
// every instruction set gets its own copy.
#pragma once

#include <cstdint>
#include <utility>

#include "cpu/int8_act_layout.h"

namespace alphaquant {
namespace int8_act {

// pass.template operator()<R>(r0) for rows [r0, r0 + R) of m: full passes of ROWS, then the rest.
template <int ROWS, class Pass>
inline void for_row_passes(int64_t m, Pass&& pass) {
  int64_t r0 = 0;
  for (; r0 + ROWS <= m; r0 += ROWS) pass.template operator()<ROWS>(r0);
  const int64_t left = m - r0;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((left == R + 1 ? pass.template operator()<R + 1>(r0) : void()), ...);
  }(std::make_integer_sequence<int, ROWS - 1>{});
}

// kernel.template operator()<SBITS, TABLE>() for the layout's field width (TABLE: 4-bit codes of a
// float grid, looked up in Problem::table16).
template <class Kernel>
inline void by_field_width(const Problem& p, Kernel&& kernel) {
  switch (p.sbits) {
    case 2: return kernel.template operator()<2, false>();
    case 4: return p.table16 ? kernel.template operator()<4, true>() : kernel.template operator()<4, false>();
    default: return kernel.template operator()<8, false>();
  }
}

}  // namespace int8_act
}  // namespace alphaquant
