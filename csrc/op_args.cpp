// Argument checks and format parsing shared by every launcher (host code, no kernels).
#include "alphaquant/op_args.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <sstream>

#include "alphaquant/quant_math.h"

namespace alphaquant {

namespace {

const char* kFormatNames = "int1..int8, fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1";

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

}  // namespace

FormatSpec parse_format(const std::string& name, bool symmetric) {
  if (name.size() == 4 && name.rfind("int", 0) == 0 && name[3] >= '1' && name[3] <= '8') {
    TORCH_CHECK_VALUE(!(name[3] == '1' && symmetric), "alphaquant: int1 has no symmetric form (its symmetric ",
                      "range [-1, 0] has qmax = 0, so max|x| / qmax is undefined); use symmetric=False");
    return {FormatId::kInt, name[3] - '0', symmetric, 0.0f};
  }
  FormatSpec f{FormatId::kInt, 0, true, 0.0f};
  if (name == "fp8_e4m3") f = {FormatId::kFP8E4M3, 8, true, FP8E4M3::max_value()};
  else if (name == "fp8_e5m2") f = {FormatId::kFP8E5M2, 8, true, FP8E5M2::max_value()};
  else if (name == "fp6_e3m2") f = {FormatId::kFP6E3M2, 6, true, FP6E3M2::max_value()};
  else if (name == "fp6_e2m3") f = {FormatId::kFP6E2M3, 6, true, FP6E2M3::max_value()};
  else if (name == "fp4_e2m1") f = {FormatId::kFP4E2M1, 4, true, FP4E2M1::max_value()};
  else TORCH_CHECK_VALUE(false, "alphaquant: unknown format '", name, "'; allowed: ", kFormatNames);
  TORCH_CHECK_VALUE(symmetric, "alphaquant: float format ", name,
                    " is symmetric by definition; asymmetric (symmetric=False) is only for int formats");
  return f;
}

std::string format_name(const FormatSpec& f) {
  switch (f.id) {
    case FormatId::kInt: return "int" + std::to_string(f.bits) + (f.symmetric ? "" : " (asymmetric)");
    case FormatId::kFP8E4M3: return "fp8_e4m3";
    case FormatId::kFP8E5M2: return "fp8_e5m2";
    case FormatId::kFP6E3M2: return "fp6_e3m2";
    case FormatId::kFP6E2M3: return "fp6_e2m3";
    case FormatId::kFP4E2M1: return "fp4_e2m1";
  }
  return "?";
}

GroupLayout make_layout(at::IntArrayRef shape, int64_t group_size) {
  TORCH_CHECK_VALUE(!shape.empty(), "alphaquant: expected a tensor with at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(group_size > 0 || group_size == 0 || group_size == -1, "alphaquant: group_size must be > 0 (groups along the last dimension), ",
                    "0 (per-channel: one group per row) or -1 (per-tensor); got ", group_size);
  GroupLayout l;
  l.k = shape.back();
  int64_t numel = 1;
  for (auto s : shape) numel *= s;
  l.rows = l.k == 0 ? 0 : numel / l.k;
  l.per_tensor = group_size == -1;
  l.group_size = (group_size <= 0 || group_size >= l.k) ? std::max<int64_t>(l.k, 1) : group_size;
  l.groups = (l.k + l.group_size - 1) / l.group_size;
  return l;
}

std::vector<int64_t> scale_shape(at::IntArrayRef shape, const GroupLayout& l) {
  std::vector<int64_t> s(shape.begin(), shape.end());
  if (l.per_tensor) return std::vector<int64_t>(s.size(), 1);
  s.back() = l.groups;
  return s;
}

void check_floating(const char* op, const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "alphaquant.", op,
                   ": input must be float32, float16 or bfloat16; got ", t);
}

void check_output_dtype(const char* op, at::ScalarType t) {
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "alphaquant.", op,
                   ": output dtype must be float32, float16 or bfloat16; got ", t);
}

void check_same_device(const char* op, const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "alphaquant.", op, ": ", name, " is on ", b.device(),
                    " but the input is on ", a.device(), "; move them to the same device");
}

static at::Tensor checked_params(const char* op, const at::Tensor& ref, const at::Tensor& t, const char* name,
                                 const std::vector<int64_t>& expected, const std::string& context) {
  check_same_device(op, ref, t, name);
  TORCH_CHECK_VALUE(t.sizes().vec() == expected, "alphaquant.", op, ": ", name, " has shape ", t.sizes(),
                    "; expected ", at::IntArrayRef(expected), " for ", context);
  TORCH_CHECK_TYPE(t.is_floating_point(), "alphaquant.", op, ": ", name, " must be a floating tensor; got ",
                   t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

static std::string layout_context(at::IntArrayRef shape, int64_t group_size) {
  std::ostringstream os;
  os << "input shape " << shape << " with group_size=" << group_size;
  return os.str();
}

QuantizeArgs prepare_quantize(const char* op, const at::Tensor& x, const std::string& fmt, bool symmetric,
                              int64_t group_size, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& zero_point) {
  check_floating(op, x);
  QuantizeArgs a;
  a.fmt = parse_format(fmt, symmetric);
  a.layout = make_layout(x.sizes(), group_size);
  TORCH_CHECK_VALUE(x.numel() > 0, "alphaquant.", op, ": input is empty (shape ", x.sizes(),
                    "); quantization needs at least one element");
  a.x = x.contiguous();
  a.scale_shape = scale_shape(x.sizes(), a.layout);
  const bool asym = !a.fmt.is_float() && !a.fmt.symmetric;
  const std::string ctx = layout_context(x.sizes(), group_size);
  if (scale.has_value()) {
    a.scale = checked_params(op, x, *scale, "scale", a.scale_shape, ctx);
    if (asym) {
      TORCH_CHECK_VALUE(zero_point.has_value(), "alphaquant.", op,
                        ": asymmetric formats need zero_point together with a given scale");
      a.zero = checked_params(op, x, *zero_point, "zero_point", a.scale_shape, ctx);
    }
  } else {
    TORCH_CHECK_VALUE(!zero_point.has_value(), "alphaquant.", op,
                      ": zero_point was given without scale; pass both (static) or neither (dynamic)");
  }
  if (!asym) {
    TORCH_CHECK_VALUE(!zero_point.has_value(), "alphaquant.", op, ": zero_point is only used by asymmetric ",
                      "int formats; ", fmt, " (symmetric=", symmetric, ") takes none");
  }
  if (a.layout.per_tensor && !a.scale.has_value()) {
    // One group spanning every element: a plain reduction, done with ATen on either device.
    const at::Tensor xf = a.x.to(at::kFloat);
    const at::Tensor finite = at::isfinite(xf);
    const bool all_finite = finite.all().item<bool>();
    if (!all_finite && !a.fmt.holds_nonfinite()) raise_kernel_error(op, kErrNonFinite, a.fmt);
    auto [mn, mx] = at::aminmax(at::where(finite, xf, at::zeros({}, xf.options())));
    GroupStats s;
    s.mn = mn.item<float>();
    s.mx = mx.item<float>();
    const ScaleZero sz = group_scale(a.fmt, s);
    const auto opts = x.options().dtype(at::kFloat);
    a.scale = at::full(a.scale_shape, sz.scale, opts);
    if (asym) a.zero = at::full(a.scale_shape, sz.zero, opts);
  }
  return a;
}

DequantizeArgs prepare_dequantize(const char* op, const at::Tensor& packed, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& zero_point, const std::string& fmt,
                                  bool symmetric, int64_t group_size, int64_t k) {
  DequantizeArgs a;
  a.fmt = parse_format(fmt, symmetric);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "alphaquant.", op, ": packed must be uint8; got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() >= 1, "alphaquant.", op, ": packed must have at least one dimension");
  TORCH_CHECK_VALUE(k > 0, "alphaquant.", op, ": k (values per row) must be > 0; got ", k);
  const int64_t row_bytes = packed_row_bytes(k, a.fmt.bits);
  TORCH_CHECK_VALUE(packed.size(-1) == row_bytes, "alphaquant.", op, ": packed rows hold ", packed.size(-1),
                    " bytes, but ", k, " values of ", a.fmt.bits, " bits take ", row_bytes);
  TORCH_CHECK_VALUE(packed.numel() > 0, "alphaquant.", op, ": packed is empty (shape ", packed.sizes(), ")");
  a.out_shape = packed.sizes().vec();
  a.out_shape.back() = k;
  a.layout = make_layout(a.out_shape, group_size);
  a.packed = packed.contiguous();
  const auto expected = scale_shape(a.out_shape, a.layout);
  const std::string ctx = layout_context(a.out_shape, group_size);
  a.scale = checked_params(op, packed, scale, "scale", expected, ctx);
  const bool asym = !a.fmt.is_float() && !a.fmt.symmetric;
  if (asym) {
    TORCH_CHECK_VALUE(zero_point.has_value(), "alphaquant.", op, ": asymmetric ", fmt, " needs zero_point");
    a.zero = checked_params(op, packed, *zero_point, "zero_point", expected, ctx);
  } else {
    TORCH_CHECK_VALUE(!zero_point.has_value() || zero_point->numel() == 0, "alphaquant.", op,
                      ": zero_point is only used by asymmetric int formats; ", fmt, " takes none");
  }
  return a;
}

void raise_kernel_error(const char* op, int flags, const FormatSpec& fmt) {
  TORCH_CHECK_VALUE(!(flags & kErrNonFinite), "alphaquant.", op, ": input contains NaN or Inf, which ",
                    format_name(fmt), " cannot represent (only fp8_e4m3 and fp8_e5m2 hold them); ",
                    "clean the input or pick an fp8 format");
  TORCH_CHECK_VALUE(!(flags & kErrBadScale), "alphaquant.", op,
                    ": scale must be finite and > 0 everywhere (and zero_point finite)");
}

}  // namespace alphaquant

namespace alphaquant {

static void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 8, "alphaquant.", op, ": bits must be in 1..8; got ", bits);
}

void check_pack_args(const char* op, const at::Tensor& codes, int64_t bits) {
  check_bits(op, bits);
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, "alphaquant.", op, ": codes must be uint8; got ",
                   codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() >= 1 && codes.numel() > 0, "alphaquant.", op,
                    ": codes must be a non-empty tensor with at least one dimension; got shape ", codes.sizes());
  if (bits < 8) {
    const int64_t top = codes.max().item<int64_t>();
    TORCH_CHECK_VALUE(top < (int64_t{1} << bits), "alphaquant.", op, ": code ", top, " does not fit in ", bits,
                      " bits (allowed 0..", (int64_t{1} << bits) - 1, ")");
  }
}

void check_unpack_args(const char* op, const at::Tensor& packed, int64_t bits, int64_t k) {
  check_bits(op, bits);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "alphaquant.", op, ": packed must be uint8; got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() >= 1 && packed.numel() > 0, "alphaquant.", op,
                    ": packed must be a non-empty tensor with at least one dimension; got shape ", packed.sizes());
  TORCH_CHECK_VALUE(k > 0, "alphaquant.", op, ": k (codes per row) must be > 0; got ", k);
  const int64_t row_bytes = packed_row_bytes(k, static_cast<int>(bits));
  TORCH_CHECK_VALUE(packed.size(-1) == row_bytes, "alphaquant.", op, ": packed rows hold ", packed.size(-1),
                    " bytes, but ", k, " codes of ", bits, " bits take ", row_bytes);
}

void check_decode_args(const char* op, const at::Tensor& codes, const FormatSpec& fmt) {
  TORCH_CHECK_VALUE(fmt.is_float(), "alphaquant.", op, ": ", format_name(fmt),
                    " is not a float format; allowed: fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1");
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, "alphaquant.", op, ": codes must be uint8; got ",
                   codes.scalar_type());
  if (fmt.bits < 8 && codes.numel() > 0) {
    const int64_t top = codes.max().item<int64_t>();
    TORCH_CHECK_VALUE(top < (int64_t{1} << fmt.bits), "alphaquant.", op, ": code ", top, " is not a ",
                      format_name(fmt), " code (allowed 0..", (int64_t{1} << fmt.bits) - 1, ")");
  }
}

}  // namespace alphaquant

namespace alphaquant {

LinearArgs prepare_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          const std::optional<at::Tensor>& zero_point, const std::optional<at::Tensor>& bias,
                          const std::string& fmt, bool symmetric, int64_t group_size, int64_t k) {
  check_floating("linear", x);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == k, "alphaquant.linear: x must have last dimension k=", k,
                    "; got shape ", x.sizes());
  TORCH_CHECK_VALUE(packed.dim() == 2, "alphaquant.linear: the packed weight must be 2-D [n, bytes per row]; got shape ",
                    packed.sizes());
  check_same_device("linear", x, packed, "packed weight");
  DequantizeArgs d = prepare_dequantize("linear", packed, scale, zero_point, fmt, symmetric, group_size, k);
  LinearArgs a;
  a.fmt = d.fmt;
  a.layout = d.layout;
  a.packed = d.packed;
  a.scale = d.scale;
  a.zero = d.zero;
  TORCH_CHECK_VALUE(x.numel() > 0, "alphaquant.linear: x is empty (shape ", x.sizes(), ")");
  a.x2d = x.reshape({-1, k}).contiguous();
  const int64_t n = packed.size(0);
  if (bias.has_value()) {
    check_same_device("linear", x, *bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "alphaquant.linear: bias must have shape [", n,
                      "]; got ", bias->sizes());
    a.bias = bias->to(at::kFloat).contiguous();
  }
  a.out_shape = x.sizes().vec();
  a.out_shape.back() = n;
  a.fmt_name = fmt;
  a.group_size_arg = group_size;
  return a;
}

at::Tensor dequantize_weight(const LinearArgs& a, at::ScalarType dtype, int64_t n0, int64_t rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("alphaquant::dequantize", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::string&, bool, int64_t, int64_t, at::ScalarType)>();
  if (rows < 0) rows = a.layout.rows - n0;
  auto slice = [&](const at::Tensor& t) { return a.layout.per_tensor ? t : t.narrow(0, n0, rows); };
  std::optional<at::Tensor> zero;
  if (a.zero) zero = slice(*a.zero);
  return op.call(a.packed.narrow(0, n0, rows), slice(a.scale), zero, a.fmt_name, a.fmt.symmetric, a.group_size_arg,
                 a.layout.k, dtype);
}

}  // namespace alphaquant
