// Value of every code of a float or code book format (256 entries; unused ones are 0), built once.
#pragma once

#include <array>

#include "alphaquant/format_spec.h"

namespace alphaquant {

template <class CODEC>
const float* decode_table_for() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (uint32_t c = 0; c < (1u << CODEC::kBits); ++c) t[c] = CODEC::decode(c);
    return t;
  }();
  return table.data();
}

inline const float* decode_table(const FormatSpec& f) {
  switch (f.id) {
    case FormatId::kFP8E4M3: return decode_table_for<FP8E4M3>();
    case FormatId::kFP8E5M2: return decode_table_for<FP8E5M2>();
    case FormatId::kFP6E3M2: return decode_table_for<FP6E3M2>();
    case FormatId::kFP6E2M3: return decode_table_for<FP6E2M3>();
    case FormatId::kFP4E2M1: return decode_table_for<FP4E2M1>();
    case FormatId::kNF4: return decode_table_for<NF4>();
    case FormatId::kInt: break;
  }
  return nullptr;
}

}  // namespace alphaquant
