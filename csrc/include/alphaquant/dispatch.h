// Run-time format and code width -> compile-time codec: the one switch every launcher uses.
#pragma once

#include <c10/util/Exception.h>

#include "alphaquant/format_spec.h"

namespace alphaquant {

// Calls fn.template operator()<BITS>() for a code width of 1..8.
template <class Fn>
void dispatch_bits(int bits, Fn&& fn) {
  switch (bits) {
    case 1: return fn.template operator()<1>();
    case 2: return fn.template operator()<2>();
    case 3: return fn.template operator()<3>();
    case 4: return fn.template operator()<4>();
    case 5: return fn.template operator()<5>();
    case 6: return fn.template operator()<6>();
    case 7: return fn.template operator()<7>();
    case 8: return fn.template operator()<8>();
  }
  TORCH_CHECK(false, "alphaquant: internal error, unhandled code width ", bits);
}

// Calls fn.template operator()<CODEC, BITS>() for the format: CODEC is a Minifloat for float
// formats, NF4 for the code book, void for integers; BITS the code width. Every codec has
// kBits, decode(code), encode(x, noise, stochastic) and max_value() (formats.h).
template <class Fn>
void dispatch_format(const FormatSpec& f, Fn&& fn) {
  switch (f.id) {
    case FormatId::kFP8E4M3: return fn.template operator()<FP8E4M3, 8>();
    case FormatId::kFP8E5M2: return fn.template operator()<FP8E5M2, 8>();
    case FormatId::kFP6E3M2: return fn.template operator()<FP6E3M2, 6>();
    case FormatId::kFP6E2M3: return fn.template operator()<FP6E2M3, 6>();
    case FormatId::kFP4E2M1: return fn.template operator()<FP4E2M1, 4>();
    case FormatId::kNF4: return fn.template operator()<NF4, 4>();
    case FormatId::kInt:
      return dispatch_bits(f.bits, [&]<int BITS>() { return fn.template operator()<void, BITS>(); });
  }
  TORCH_CHECK(false, "alphaquant: internal error, unhandled format");
}

}  // namespace alphaquant
