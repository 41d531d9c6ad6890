// Format names and group layouts from an op's arguments (host code, no kernels).
#include "alphaquant/format_and_layout.h"

#include <algorithm>
#include <sstream>

namespace alphaquant {

namespace {
const char* kFormatNames =
    "int1..int8, fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, nf4, "
    "mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4_e2m1, mxint8, nvfp4";

// MX element formats and the exponent of each one's largest power of two (formats.h).
struct MxElement {
  const char* name;
  int emax;
};
constexpr MxElement kMxElements[] = {{"fp8_e4m3", 8}, {"fp8_e5m2", 15}, {"fp6_e3m2", 4},
                                     {"fp6_e2m3", 2}, {"fp4_e2m1", 2},  {"int8", 0}};

FormatSpec float_format(FormatId id, int bits, float max_value) {
  return {.id = id, .bits = bits, .symmetric = true, .max_value = max_value};
}
}  // namespace

FormatSpec parse_format(const std::string& name, bool symmetric) {
  if (name == "nvfp4") {
    TORCH_CHECK_VALUE(symmetric, "alphaquant: nvfp4 is symmetric by definition (E4M3 block scales and a global ",
                      "scale, no zero point); use symmetric=True");
    FormatSpec f = parse_format("fp4_e2m1", true);
    f.nvfp4 = true;
    return f;
  }
  if (name.rfind("mx", 0) == 0) {
    for (const MxElement& e : kMxElements) {
      if (name.compare(2, std::string::npos, e.name) != 0) continue;
      TORCH_CHECK_VALUE(symmetric, "alphaquant: MX format ", name, " is symmetric by definition (one shared ",
                        "power-of-two scale per block, no zero point); use symmetric=True");
      FormatSpec f = parse_format(e.name, true);
      f.mx = true;
      f.mx_emax = e.emax;
      return f;
    }
  }
  if (name.size() == 4 && name.rfind("int", 0) == 0 && name[3] >= '1' && name[3] <= '8') {
    TORCH_CHECK_VALUE(!(name[3] == '1' && symmetric), "alphaquant: int1 has no symmetric form (its symmetric ",
                      "range [-1, 0] has qmax = 0, so max|x| / qmax is undefined); use symmetric=False");
    return {.id = FormatId::kInt, .bits = name[3] - '0', .symmetric = symmetric, .max_value = 0.0f};
  }
  FormatSpec f;
  if (name == "fp8_e4m3") f = float_format(FormatId::kFP8E4M3, 8, FP8E4M3::max_value());
  else if (name == "fp8_e5m2") f = float_format(FormatId::kFP8E5M2, 8, FP8E5M2::max_value());
  else if (name == "fp6_e3m2") f = float_format(FormatId::kFP6E3M2, 6, FP6E3M2::max_value());
  else if (name == "fp6_e2m3") f = float_format(FormatId::kFP6E2M3, 6, FP6E2M3::max_value());
  else if (name == "fp4_e2m1") f = float_format(FormatId::kFP4E2M1, 4, FP4E2M1::max_value());
  else if (name == "nf4") f = float_format(FormatId::kNF4, 4, NF4::max_value());
  else TORCH_CHECK_VALUE(false, "alphaquant: unknown format '", name, "'; allowed: ", kFormatNames);
  TORCH_CHECK_VALUE(symmetric, "alphaquant: ", f.id == FormatId::kNF4 ? "code book" : "float", " format ", name,
                    " is symmetric by definition; asymmetric (symmetric=False) is only for int formats");
  return f;
}

std::string format_name(const FormatSpec& f) {
  if (f.nvfp4) return "nvfp4";
  if (f.mx) {
    FormatSpec element = f;
    element.mx = false;
    return "mx" + format_name(element);
  }
  switch (f.id) {
    case FormatId::kInt: return "int" + std::to_string(f.bits) + (f.symmetric ? "" : " (asymmetric)");
    case FormatId::kFP8E4M3: return "fp8_e4m3";
    case FormatId::kFP8E5M2: return "fp8_e5m2";
    case FormatId::kFP6E3M2: return "fp6_e3m2";
    case FormatId::kFP6E2M3: return "fp6_e2m3";
    case FormatId::kFP4E2M1: return "fp4_e2m1";
    case FormatId::kNF4: return "nf4";
  }
  return "?";
}

GroupLayout make_layout(at::IntArrayRef shape, int64_t group_size) {
  TORCH_CHECK_VALUE(!shape.empty(), "alphaquant: expected a tensor with at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(group_size >= -1, "alphaquant: group_size must be > 0 (groups along the last dimension), ",
                    "0 (per-channel: one group per row) or -1 (per-tensor); got ", group_size);
  const int64_t k = shape.back();
  int64_t numel = 1;
  for (auto s : shape) numel *= s;
  const int64_t g = (group_size <= 0 || group_size >= k) ? std::max<int64_t>(k, 1) : group_size;
  return {.rows = k == 0 ? 0 : numel / k,
          .k = k,
          .group_size = g,
          .groups = (k + g - 1) / g,
          .per_tensor = group_size == -1};
}

std::vector<int64_t> scale_shape(at::IntArrayRef shape, const GroupLayout& l) {
  std::vector<int64_t> s(shape.begin(), shape.end());
  if (l.per_tensor) return std::vector<int64_t>(s.size(), 1);
  s.back() = l.groups;
  return s;
}

std::string layout_context(at::IntArrayRef shape, int64_t group_size) {
  std::ostringstream os;
  os << "input shape " << shape << " with group_size=" << group_size;
  return os.str();
}

}  // namespace alphaquant
