// Argument checks shared by every launcher, and the preparation that follows from them (host
// code, no kernels).
#include "alphaquant/arg_checks.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cfloat>
#include <cmath>

namespace alphaquant {

void check_floating(const char* op, const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "alphaquant.", op,
                   ": input must be float32, float16 or bfloat16; got ", t);
}

void check_output_dtype(const char* op, at::ScalarType t) {
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "alphaquant.", op,
                   ": output dtype must be float32, float16 or bfloat16; got ", t);
}

void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "alphaquant.", op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; every tensor argument must be on the same device");
}

void check_row_length(const char* op, int64_t k, int64_t rows) {
  TORCH_CHECK_VALUE(k > 0, "alphaquant.", op, ": k (values per row) must be > 0; got ", k);
  const int64_t most = rows > 1 ? std::min(kMaxRowLength, INT64_MAX / rows) : kMaxRowLength;
  TORCH_CHECK_VALUE(k <= most, "alphaquant.", op, ": k=", k, " is too large for ", rows,
                    " row(s): sizes derived from it would overflow int64; at most ", most);
}

void raise_kernel_error(const char* op, int flags, const FormatSpec& fmt) {
  // MX formats take NaN/Inf (their blocks get the NaN scale, mx_nan_blocks.cpp): for them only a
  // bad given scale reaches this.
  TORCH_CHECK_VALUE(!(flags & kErrNonFinite) || fmt.mx, "alphaquant.", op, ": input contains NaN or Inf, which ",
                    format_name(fmt), " cannot represent (only fp8_e4m3 and fp8_e5m2 hold them); ",
                    "clean the input or pick an fp8 format");
  TORCH_CHECK_VALUE(!(flags & kErrBadScale), "alphaquant.", op,
                    ": scale must be finite and > 0 everywhere (and zero_point finite)");
  TORCH_INTERNAL_ASSERT(false, "alphaquant.", op, ": unknown kernel error flags ", flags);
}

void raise_codebook_error(const char* op, int flags) {
  TORCH_CHECK_VALUE(!(flags & kErrBadScale), "alphaquant.", op, ": scale must be finite and > 0 everywhere");
  TORCH_CHECK_VALUE(!(flags & kErrBadCodebook), "alphaquant.", op, ": codebook values must be finite");
  TORCH_INTERNAL_ASSERT(false, "alphaquant.", op, ": unknown kernel error flags ", flags);
}

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

// packed [..., row bytes] holding rows of k codes of `bits` bits.
static void check_packed_rows(const char* op, const at::Tensor& packed, int bits, int64_t k, const char* what) {
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "alphaquant.", op, ": packed must be uint8; got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() >= 1 && packed.numel() > 0, "alphaquant.", op,
                    ": packed must be a non-empty tensor with at least one dimension; got shape ", packed.sizes());
  check_row_length(op, k, packed.numel() / packed.size(-1));
  const int64_t row_bytes = packed_row_bytes(k, bits);
  TORCH_CHECK_VALUE(packed.size(-1) == row_bytes, "alphaquant.", op, ": packed rows hold ", packed.size(-1),
                    " bytes, but ", k, " ", what, " of ", bits, " bits take ", row_bytes);
}

void check_unpack_args(const char* op, const at::Tensor& packed, int64_t bits, int64_t k) {
  check_bits(op, bits);
  check_packed_rows(op, packed, static_cast<int>(bits), k, "codes");
}

void check_decode_args(const char* op, const at::Tensor& codes, const FormatSpec& fmt) {
  TORCH_CHECK_VALUE(fmt.is_float_or_codebook(), "alphaquant.", op, ": ", format_name(fmt),
                    " is not a float format (nor a code book format); allowed: fp8_e4m3, fp8_e5m2, fp6_e3m2, ",
                    "fp6_e2m3, fp4_e2m1, nf4");
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, "alphaquant.", op, ": codes must be uint8; got ",
                   codes.scalar_type());
  if (fmt.bits < 8 && codes.numel() > 0) {
    const int64_t top = codes.max().item<int64_t>();
    TORCH_CHECK_VALUE(top < (int64_t{1} << fmt.bits), "alphaquant.", op, ": code ", top, " is not a ",
                      format_name(fmt), " code (allowed 0..", (int64_t{1} << fmt.bits) - 1, ")");
  }
}

// A scale or zero point argument: on ref's device, of the expected shape, floating; as float32.
static at::Tensor checked_params(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                                 const char* name, const std::vector<int64_t>& expected, const std::string& context) {
  check_same_device(op, ref, ref_name, t, name);
  TORCH_CHECK_VALUE(t.sizes().vec() == expected, "alphaquant.", op, ": ", name, " has shape ", t.sizes(),
                    "; expected ", at::IntArrayRef(expected), " for ", context);
  TORCH_CHECK_TYPE(t.is_floating_point(), "alphaquant.", op, ": ", name, " must be a floating tensor; got ",
                   t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

// A zero point argument: floating as checked_params, or uint8 one-byte zero points (formats.h),
// which are decoded to float32 here.
static at::Tensor checked_zero_points(const char* op, const at::Tensor& ref, const char* ref_name,
                                      const at::Tensor& t, const std::vector<int64_t>& expected,
                                      const std::string& context, int bits) {
  check_same_device(op, ref, ref_name, t, "zero_point");
  TORCH_CHECK_VALUE(t.sizes().vec() == expected, "alphaquant.", op, ": zero_point has shape ", t.sizes(),
                    "; expected ", at::IntArrayRef(expected), " for ", context);
  TORCH_CHECK_TYPE(t.is_floating_point() || t.scalar_type() == at::kByte, "alphaquant.", op,
                   ": zero_point must be a floating tensor or uint8 (one-byte zero points); got ", t.scalar_type());
  if (t.scalar_type() != at::kByte) return t.to(at::kFloat).contiguous();
  const ZeroGrid g = zero_grid(bits);
  return (t.to(at::kFloat) * g.step + g.lowest).contiguous();
}

// MX formats (formats.h) have one scale per block of 32 values, NVFP4 one per block of 16.
static void check_block_group(const char* op, const FormatSpec& f, int64_t group_size) {
  if (!f.is_block_scaled()) return;
  const int64_t block = f.mx ? kMxBlock : kNvfp4Block;
  TORCH_CHECK_VALUE(group_size == block, "alphaquant.", op, ": ", format_name(f), " shares one scale per block of ",
                    block, " values: group_size must be ", block, "; got ", group_size);
}

// ---------------------------------------------------------------- NVFP4 scales (formats.h)

// nvfp4's global scale, passed as zero_point: a floating tensor of shape [1] on ref's device.
static at::Tensor checked_global_scale(const char* op, const at::Tensor& ref, const char* ref_name,
                                       const std::optional<at::Tensor>& g) {
  TORCH_CHECK_VALUE(g.has_value(), "alphaquant.", op, ": nvfp4 needs its float32 global scale (shape [1]) as ",
                    "zero_point, as quantize returns it (nvfp4 has no zero point)");
  check_same_device(op, ref, ref_name, *g, "zero_point (nvfp4's global scale)");
  TORCH_CHECK_VALUE(g->dim() == 1 && g->numel() == 1, "alphaquant.", op, ": nvfp4's global scale (zero_point) must ",
                    "have shape [1]; got ", g->sizes());
  TORCH_CHECK_TYPE(g->is_floating_point(), "alphaquant.", op, ": nvfp4's global scale (zero_point) must be a ",
                   "floating tensor; got ", g->scalar_type());
  return g->to(at::kFloat).contiguous();
}

// bytes -> table[byte] in one pass (CPU).
static at::Tensor look_up(const at::Tensor& codes, const std::array<float, 256>& table) {
  const at::Tensor c = codes.contiguous();
  at::Tensor out = at::empty(c.sizes(), c.options().dtype(at::kFloat));
  const uint8_t* src = c.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, c.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = table[src[i]];
  });
  return out;
}

// S = float(e4m3 byte) / g for every byte (g: a float32 [1] CPU tensor). Bytes that are not
// positive finite E4M3 values give S <= 0 or NaN, which the kernels' scale check refuses.
static std::array<float, 256> nvfp4_scale_table(const at::Tensor& global_scale) {
  std::array<float, 256> table;
  const float g = global_scale.item<float>();
  for (int i = 0; i < 256; ++i) table[i] = FP8E4M3::decode(static_cast<uint32_t>(i)) / g;
  return table;
}

at::Tensor nvfp4_scale_values(const at::Tensor& codes, const at::Tensor& global_scale) {
  if (codes.device().is_cpu()) return look_up(codes, nvfp4_scale_table(global_scale));
  return (codes.contiguous().view(at::kFloat8_e4m3fn).to(at::kFloat) / global_scale).contiguous();
}

// 448 * 6 / max|x| (1 where that is not finite), compressed-tensors' generate_gparam.
static at::Tensor nvfp4_default_global_scale(const char* op, const at::Tensor& x, const FormatSpec& f) {
  const at::Tensor amax = x.abs().amax().to(at::kFloat).reshape({1});
  if (!std::isfinite(amax.item<float>())) raise_kernel_error(op, kErrNonFinite, f);
  const at::Tensor g = at::full({1}, 448.0f * 6.0f, amax.options()) / amax.clamp_min(FLT_MIN);
  return at::where(at::isfinite(g), g, at::ones_like(g));
}

// The E4M3 block scale bytes of x [rows, k] under global scale g (formats.h): per block
// e4m3((max|x| / 6) * g) saturated at 448, a zero byte replaced by 0.125's.
static at::Tensor nvfp4_scale_codes(const char* op, const FormatSpec& f, const at::Tensor& x, const GroupLayout& l,
                                    const at::Tensor& g, const std::vector<int64_t>& scale_shape) {
  at::Tensor rows = x.reshape({l.rows, l.k});
  const int64_t padded = l.groups * l.group_size;
  if (padded != l.k) rows = at::constant_pad_nd(rows, {0, padded - l.k}, 0);  // zeros leave max|x| alone
  const at::Tensor amax = rows.view({l.rows, l.groups, l.group_size}).abs().amax(-1).to(at::kFloat);
  if (!at::isfinite(amax).all().item<bool>()) raise_kernel_error(op, kErrNonFinite, f);
  const at::Tensor s = ((amax / 6.0f) * g).clamp_max(448.0f);
  at::Tensor codes = s.to(at::kFloat8_e4m3fn).view(at::kByte);
  codes = at::where(codes == 0, at::full_like(codes, kNvfp4ScaleOf0), codes);
  return codes.reshape(scale_shape).contiguous();
}

// The scale 2^e of every E8M0 byte, built from float32 bits so that it is exact (2^-133 for
// mxint8's smallest is a subnormal); byte 255 is NaN, which makes its block decode to NaN.
static std::array<float, 256> mx_scale_table(const FormatSpec& f) {
  const int shift = kE8M0Bias + (f.id == FormatId::kInt ? kMxIntShift : 0);
  std::array<float, 256> table;
  for (int i = 0; i < 256; ++i) table[i] = i == 255 ? bits_float(0x7fc00000u) : pow2_wide(i - shift);
  return table;
}

at::Tensor mx_scale_values(const at::Tensor& codes, const FormatSpec& f) {
  if (codes.device().is_cpu()) return look_up(codes, mx_scale_table(f));
  const int shift = kE8M0Bias + (f.id == FormatId::kInt ? kMxIntShift : 0);
  const at::Tensor e = codes.to(at::kInt) - shift;
  const at::Tensor normal = at::bitwise_left_shift((e + 127).clamp_min(0), 23);
  const at::Tensor subnormal = at::bitwise_left_shift(at::ones_like(e), (e + 149).clamp(0, 22));
  at::Tensor bits = at::where(e >= -126, normal, subnormal);
  bits = at::where(codes == 255, at::full_like(bits, 0x7fc00000), bits);
  return bits.view(at::kFloat).contiguous();
}

at::Tensor mx_scale_codes(const at::Tensor& scale, const FormatSpec& f) {
  // Powers of two 2^e -> E8M0 bytes: frexp gives (0.5, e + 1) exactly, subnormals included.
  const at::Tensor exponent = std::get<1>(at::frexp(scale));
  return (exponent - 1 + kE8M0Bias + (f.id == FormatId::kInt ? kMxIntShift : 0)).to(at::kByte);
}

at::Tensor returned_scale(const QuantizeArgs& a, const at::Tensor& scale) {
  if (a.fmt.nvfp4) return *a.scale_codes;
  return a.fmt.mx ? mx_scale_codes(scale, a.fmt) : scale;
}

// The scale bytes of a block-scaled format: on ref's device, of the expected shape, E8M0 (MX: uint8) or
// E4M3 (nvfp4: uint8 or float8_e4m3fn) bytes; as uint8.
static at::Tensor checked_scale_bytes(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                                      const std::vector<int64_t>& expected, const std::string& context,
                                      const FormatSpec& f) {
  check_same_device(op, ref, ref_name, t, "scale");
  TORCH_CHECK_VALUE(t.sizes().vec() == expected, "alphaquant.", op, ": scale has shape ", t.sizes(), "; expected ",
                    at::IntArrayRef(expected), " for ", context);
  if (f.nvfp4) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kByte || t.scalar_type() == at::kFloat8_e4m3fn, "alphaquant.", op,
                     ": nvfp4 scales are E4M3 bytes (uint8 or float8_e4m3fn); got ", t.scalar_type());
  } else {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kByte, "alphaquant.", op, ": ", format_name(f),
                     " scales are E8M0 bytes (uint8: X = 2^(e - 127)); got ", t.scalar_type());
  }
  return t.view(at::kByte).contiguous();
}

// A scale argument: float (checked_params), or for MX formats E8M0 bytes and for nvfp4 E4M3 bytes
// (with the global scale g) decoded to float32.
static at::Tensor checked_scales(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                                 const std::vector<int64_t>& expected, const std::string& context,
                                 const FormatSpec& f, const at::Tensor* global_scale = nullptr) {
  if (!f.is_block_scaled()) return checked_params(op, ref, ref_name, t, "scale", expected, context);
  const at::Tensor bytes = checked_scale_bytes(op, ref, ref_name, t, expected, context, f);
  return f.nvfp4 ? nvfp4_scale_values(bytes, *global_scale) : mx_scale_values(bytes, f);
}

QuantizeArgs prepare_quantize(const char* op, const at::Tensor& x, const std::string& fmt, bool symmetric,
                              int64_t group_size, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& zero_point, TensorStatsFn tensor_stats) {
  check_floating(op, x);
  QuantizeArgs a;
  a.fmt = parse_format(fmt, symmetric);
  check_block_group(op, a.fmt, group_size);
  a.layout = make_layout(x.sizes(), group_size);
  TORCH_CHECK_VALUE(x.numel() > 0, "alphaquant.", op, ": input is empty (shape ", x.sizes(),
                    "); quantization needs at least one element");
  a.x = x.contiguous();
  a.scale_shape = scale_shape(x.sizes(), a.layout);
  const bool asym = a.fmt.is_asymmetric_int();
  const std::string ctx = layout_context(x.sizes(), group_size);
  if (a.fmt.nvfp4) {
    // zero_point carries the global scale: given, or 448 * 6 / max|x|. Block scale bytes are given
    // or chosen here; the kernels then quantize with the decoded float32 scales as static ones.
    a.global_scale = zero_point.has_value() ? checked_global_scale(op, x, "x", zero_point)
                                            : nvfp4_default_global_scale(op, a.x, a.fmt);
    a.scale_codes = scale.has_value()
                        ? checked_scale_bytes(op, x, "x", *scale, a.scale_shape, ctx, a.fmt)
                        : nvfp4_scale_codes(op, a.fmt, a.x, a.layout, *a.global_scale, a.scale_shape);
    a.scale = nvfp4_scale_values(*a.scale_codes, *a.global_scale);
    return a;
  }
  if (scale.has_value()) {
    a.scale = checked_scales(op, x, "x", *scale, a.scale_shape, ctx, a.fmt);
    if (asym) {
      TORCH_CHECK_VALUE(zero_point.has_value(), "alphaquant.", op,
                        ": asymmetric formats need zero_point together with a given scale");
      a.zero = checked_zero_points(op, x, "x", *zero_point, a.scale_shape, ctx, a.fmt.bits);
    }
  } else {
    TORCH_CHECK_VALUE(!zero_point.has_value(), "alphaquant.", op,
                      ": zero_point was given without scale; pass both (static) or neither (dynamic)");
  }
  if (!asym) {
    TORCH_CHECK_VALUE(!zero_point.has_value(), "alphaquant.", op, ": zero_point is only used by asymmetric ",
                      "int formats; ", fmt, " (symmetric=", symmetric ? "True" : "False", ") takes none");
  }
  if (a.layout.per_tensor && !a.scale.has_value()) {
    // One group spanning every element: its scale is known before any kernel runs.
    const GroupStats s = tensor_stats(a.x);
    if (s.nonfinite && !a.fmt.holds_nonfinite()) raise_kernel_error(op, kErrNonFinite, a.fmt);
    const ScaleZero sz = group_scale(a.fmt, s);
    const auto opts = x.options().dtype(at::kFloat);
    a.scale = at::full(a.scale_shape, sz.scale, opts);
    if (asym) a.zero = at::full(a.scale_shape, sz.zero, opts);
  }
  return a;
}

QuantizeOutputs allocate_quantize_outputs(const QuantizeArgs& a) {
  auto packed_shape = a.x.sizes().vec();
  packed_shape.back() = packed_row_bytes(a.layout.k, a.fmt.bits);
  const auto fopts = a.x.options().dtype(at::kFloat);
  QuantizeOutputs o;
  o.packed = at::empty(packed_shape, a.x.options().dtype(at::kByte));
  o.scale = a.scale ? a.scale->clone() : at::empty(a.scale_shape, fopts);
  o.zero = a.fmt.nvfp4                  ? a.global_scale->clone()
           : !a.fmt.is_asymmetric_int() ? at::empty({0}, fopts)
           : a.zero                     ? a.zero->clone()
                                        : at::empty(a.scale_shape, fopts);
  o.scale_dst = a.scale ? nullptr : o.scale.data_ptr<float>();
  o.zero_dst = (a.fmt.is_asymmetric_int() && !a.zero) ? o.zero.data_ptr<float>() : nullptr;
  return o;
}

DequantizeArgs prepare_dequantize(const char* op, const at::Tensor& packed, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& zero_point, const std::string& fmt,
                                  bool symmetric, int64_t group_size, int64_t k, bool validate,
                                  bool keep_scale_bytes) {
  DequantizeArgs a;
  a.fmt = parse_format(fmt, symmetric);
  check_block_group(op, a.fmt, group_size);
  a.validate = validate && !a.fmt.mx;  // every E8M0 byte is a scale; 0xFF (NaN) makes its block NaN
  check_packed_rows(op, packed, a.fmt.bits, k, "values");
  a.out_shape = packed.sizes().vec();
  a.out_shape.back() = k;
  a.layout = make_layout(a.out_shape, group_size);
  a.packed = packed.contiguous();
  const auto expected = scale_shape(a.out_shape, a.layout);
  const std::string ctx = layout_context(a.out_shape, group_size);
  if (a.fmt.nvfp4) a.global_scale = checked_global_scale(op, packed, "packed", zero_point);
  if (keep_scale_bytes && a.fmt.is_block_scaled() && packed.device().is_cpu()) {
    a.scale_codes = checked_scale_bytes(op, packed, "packed", scale, expected, ctx, a.fmt);
    a.scale_table = a.fmt.nvfp4 ? nvfp4_scale_table(a.global_scale) : mx_scale_table(a.fmt);
  } else {
    a.scale = checked_scales(op, packed, "packed", scale, expected, ctx, a.fmt, &a.global_scale);
  }
  if (a.fmt.nvfp4) return a;
  if (a.fmt.is_asymmetric_int()) {
    TORCH_CHECK_VALUE(zero_point.has_value(), "alphaquant.", op, ": asymmetric ", fmt, " needs zero_point");
    a.zero = checked_zero_points(op, packed, "packed", *zero_point, expected, ctx, a.fmt.bits);
  } else {
    if (zero_point.has_value()) check_same_device(op, packed, "packed", *zero_point, "zero_point");
    TORCH_CHECK_VALUE(!zero_point.has_value() || zero_point->numel() == 0, "alphaquant.", op,
                      ": zero_point is only used by asymmetric int formats; ", fmt, " takes none");
  }
  return a;
}

ErrorArgs prepare_quantization_error(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                     const std::optional<at::Tensor>& zero_point, const std::string& fmt,
                                     bool symmetric, int64_t group_size) {
  const char* op = "quantization_error";
  check_floating(op, x);
  check_same_device(op, x, "x", packed, "packed");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.numel() > 0, "alphaquant.", op,
                    ": x must be a non-empty tensor with at least one dimension; got shape ", x.sizes());
  TORCH_CHECK_VALUE(packed.dim() == x.dim() && packed.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    "alphaquant.", op, ": packed has shape ", packed.sizes(), ", which does not hold the rows of x of ",
                    "shape ", x.sizes(), " (the same leading dimensions, then the packed bytes of a row)");
  ErrorArgs a{.x = x.contiguous(),
              .w = prepare_dequantize(op, packed, scale, zero_point, fmt, symmetric, group_size, x.size(-1), true)};
  return a;
}

// The name kernels that re-enter the dispatcher (dequantize_weight) pass with the decoded float32
// scales: a block-scaled format's element format, whose float scales give the same values.
static std::string element_format_name(const FormatSpec& f, const std::string& name) {
  return f.is_block_scaled() ? format_name(f.element()) : name;
}

LinearArgs prepare_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          const std::optional<at::Tensor>& zero_point, const std::optional<at::Tensor>& bias,
                          const std::string& fmt, bool symmetric, int64_t group_size, int64_t k, bool validate) {
  check_floating("linear", x);
  check_same_device("linear", x, "x", packed, "packed");
  if (bias.has_value()) check_same_device("linear", x, "x", *bias, "bias");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == k, "alphaquant.linear: x must have last dimension k=", k,
                    "; got shape ", x.sizes());
  TORCH_CHECK_VALUE(packed.dim() == 2, "alphaquant.linear: the packed weight must be 2-D [n, bytes per row]; got shape ",
                    packed.sizes());
  // Block-scaled formats on the CPU: the kernel reads the scale bytes (LinearArgs::scale_at).
  DequantizeArgs d = prepare_dequantize("linear", packed, scale, zero_point, fmt, symmetric, group_size, k, validate,
                                        /*keep_scale_bytes=*/true);
  TORCH_CHECK_VALUE(x.numel() > 0, "alphaquant.linear: x is empty (shape ", x.sizes(), ")");
  LinearArgs a{.x2d = x.reshape({-1, k}).contiguous(),
               .packed = d.packed,
               .fmt = d.fmt,
               .layout = d.layout,
               .scale = d.scale,
               .zero = d.zero,
               .bias = std::nullopt,
               .out_shape = x.sizes().vec(),
               .fmt_name = element_format_name(d.fmt, fmt),
               .group_size_arg = group_size,
               .validate = d.validate,
               .scale_codes = d.scale_codes,
               .global_scale = d.global_scale,
               .scale_table = d.scale_table};
  const int64_t n = packed.size(0);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "alphaquant.linear: bias must have shape [", n,
                      "]; got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->is_floating_point(), "alphaquant.linear: bias must be a floating tensor; got ",
                     bias->scalar_type());
    a.bias = bias->to(at::kFloat).contiguous();
  }
  a.out_shape.back() = n;
  return a;
}

at::Tensor dequantize_weight(const LinearArgs& a, at::ScalarType dtype, int64_t n0, int64_t rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("alphaquant::dequantize", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::string&, bool, int64_t, int64_t, at::ScalarType, bool)>();
  if (rows < 0) rows = a.layout.rows - n0;
  auto slice = [&](const at::Tensor& t) { return a.layout.per_tensor ? t : t.narrow(0, n0, rows); };
  if (a.scale_codes) {  // scale bytes (and nvfp4's global scale), as the op takes them
    const std::optional<at::Tensor> g = a.fmt.nvfp4 ? std::optional<at::Tensor>(a.global_scale) : std::nullopt;
    return op.call(a.packed.narrow(0, n0, rows), slice(*a.scale_codes), g, format_name(a.fmt), true,
                   a.group_size_arg, a.layout.k, dtype, a.validate);
  }
  std::optional<at::Tensor> zero;
  if (a.zero) zero = slice(*a.zero);
  return op.call(a.packed.narrow(0, n0, rows), slice(a.scale), zero, a.fmt_name, a.fmt.symmetric, a.group_size_arg,
                 a.layout.k, dtype, a.validate);
}

// ---------------------------------------------------------------- learned code books (lut4)

CodebookArgs prepare_dequantize_codebook(const char* op, const at::Tensor& packed, const at::Tensor& scale,
                                         const at::Tensor& codebook, int64_t group_size, int64_t k, bool validate) {
  constexpr int kSize = LearnedCodebook::kSize;
  CodebookArgs a;
  a.validate = validate;
  check_packed_rows(op, packed, LearnedCodebook::kBits, k, "values");
  a.out_shape = packed.sizes().vec();
  a.out_shape.back() = k;
  a.layout = make_layout(a.out_shape, group_size);
  a.packed = packed.contiguous();
  const std::string ctx = layout_context(a.out_shape, group_size);
  a.scale = checked_params(op, packed, "packed", scale, "scale", scale_shape(a.out_shape, a.layout), ctx);
  check_same_device(op, packed, "packed", codebook, "codebook");
  std::vector<int64_t> per_row = a.out_shape;
  per_row.back() = kSize;
  a.per_row = codebook.sizes().vec() == per_row;
  TORCH_CHECK_VALUE(a.per_row || (codebook.dim() == 1 && codebook.size(0) == kSize), "alphaquant.", op,
                    ": codebook has shape ", codebook.sizes(), "; expected [", kSize, "] (one for the tensor) or ",
                    at::IntArrayRef(per_row), " (one per row) for values of shape ", at::IntArrayRef(a.out_shape));
  TORCH_CHECK_TYPE(codebook.is_floating_point(), "alphaquant.", op, ": codebook must be a floating tensor; got ",
                   codebook.scalar_type());
  a.codebook = codebook.to(at::kFloat).contiguous().reshape({-1});
  return a;
}

CodebookLinearArgs prepare_linear_codebook(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                           const at::Tensor& codebook, const std::optional<at::Tensor>& bias,
                                           int64_t group_size, int64_t k, bool validate) {
  const char* op = "linear_codebook";
  check_floating(op, x);
  check_same_device(op, x, "x", packed, "packed");
  if (bias.has_value()) check_same_device(op, x, "x", *bias, "bias");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == k, "alphaquant.", op, ": x must have last dimension k=", k,
                    "; got shape ", x.sizes());
  TORCH_CHECK_VALUE(packed.dim() == 2, "alphaquant.", op, ": the packed weight must be 2-D [n, bytes per row]; ",
                    "got shape ", packed.sizes());
  CodebookArgs w = prepare_dequantize_codebook(op, packed, scale, codebook, group_size, k, validate);
  TORCH_CHECK_VALUE(x.numel() > 0, "alphaquant.", op, ": x is empty (shape ", x.sizes(), ")");
  CodebookLinearArgs a{.x2d = x.reshape({-1, k}).contiguous(),
                       .w = std::move(w),
                       .bias = std::nullopt,
                       .out_shape = x.sizes().vec(),
                       .group_size_arg = group_size};
  const int64_t n = packed.size(0);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "alphaquant.", op, ": bias must have shape [", n,
                      "]; got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->is_floating_point(), "alphaquant.", op, ": bias must be a floating tensor; got ",
                     bias->scalar_type());
    a.bias = bias->to(at::kFloat).contiguous();
  }
  a.out_shape.back() = n;
  return a;
}

at::Tensor dequantize_codebook_weight(const CodebookLinearArgs& a, at::ScalarType dtype, int64_t n0, int64_t rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("alphaquant::dequantize_codebook", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                         at::ScalarType, bool)>();
  const CodebookArgs& w = a.w;
  if (rows < 0) rows = w.layout.rows - n0;
  const at::Tensor scale = w.layout.per_tensor ? w.scale : w.scale.narrow(0, n0, rows);
  const at::Tensor codebook = w.per_row ? w.codebook.view({w.layout.rows, LearnedCodebook::kSize}).narrow(0, n0, rows)
                                        : w.codebook;
  return op.call(w.packed.narrow(0, n0, rows), scale, codebook, a.group_size_arg, w.layout.k, dtype, w.validate);
}

}  // namespace alphaquant
