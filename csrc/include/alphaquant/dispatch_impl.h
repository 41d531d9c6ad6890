#pragma once

namespace alphaquant {

template <class Fn>
void dispatch_format(const FormatSpec& f, Fn&& fn) {
  switch (f.id) {
    case FormatId::kFP8E4M3: return fn.template operator()<FP8E4M3, 8>();
    case FormatId::kFP8E5M2: return fn.template operator()<FP8E5M2, 8>();
    case FormatId::kFP6E3M2: return fn.template operator()<FP6E3M2, 6>();
    case FormatId::kFP6E2M3: return fn.template operator()<FP6E2M3, 6>();
    case FormatId::kFP4E2M1: return fn.template operator()<FP4E2M1, 4>();
    case FormatId::kInt:
      switch (f.bits) {
        case 1: return fn.template operator()<void, 1>();
        case 2: return fn.template operator()<void, 2>();
        case 3: return fn.template operator()<void, 3>();
        case 4: return fn.template operator()<void, 4>();
        case 5: return fn.template operator()<void, 5>();
        case 6: return fn.template operator()<void, 6>();
        case 7: return fn.template operator()<void, 7>();
        case 8: return fn.template operator()<void, 8>();
      }
  }
  TORCH_CHECK(false, "alphaquant: internal error, unhandled format");
}

}  // namespace alphaquant
