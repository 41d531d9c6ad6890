// MX blocks holding NaN or Inf (formats.h, "MX block formats"): the OCP MX spec gives such a block
// the NaN scale (E8M0 byte 0xFF), which makes every element of the block NaN whatever its code.
// The kernels flag non-finite input; the launchers then come here (host code, ATen ops, any
// device): the input is quantized again with those values zeroed, and their blocks are marked.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "alphaquant/arg_checks.h"

namespace alphaquant {

namespace {

constexpr int kE8M0NaN = 255;

// bool [..., groups]: the MX blocks of x [..., k] that hold a NaN or an Inf.
at::Tensor nonfinite_blocks(const at::Tensor& finite, const GroupLayout& l, at::IntArrayRef scale_shape) {
  at::Tensor ok = finite.reshape({l.rows, l.k});
  const int64_t padded = l.groups * l.group_size;
  if (padded != l.k) ok = at::constant_pad_nd(ok.to(at::kByte), {0, padded - l.k}, 1).to(at::kBool);
  return ok.view({l.rows, l.groups, l.group_size}).logical_not().any(-1).reshape(scale_shape);
}

}  // namespace

bool is_mx_nan_block_case(const QuantizeArgs& a, int flags) {
  return a.fmt.mx && flags == kErrNonFinite;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mx_quantize_nan_blocks(
    const QuantizeArgs& a, const std::string& fmt, int64_t group_size, const std::optional<at::Tensor>& scale,
    bool stochastic, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("alphaquant::quantize", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const std::string&, bool, int64_t, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, bool, int64_t)>();
  const at::Tensor finite = at::isfinite(a.x);
  const at::Tensor clean = at::where(finite, a.x, at::zeros({}, a.x.options()));
  auto [packed, scale_codes, zero] = op.call(clean, fmt, true, group_size, scale, std::nullopt, stochastic, seed);
  const at::Tensor bad = nonfinite_blocks(finite, a.layout, scale_codes.sizes());
  return {packed, at::where(bad, at::full({}, kE8M0NaN, scale_codes.options()), scale_codes), zero};
}

at::Tensor mx_fake_quantize_nan_blocks(const QuantizeArgs& a, const std::string& fmt, int64_t group_size,
                                       const std::optional<at::Tensor>& scale, bool stochastic, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("alphaquant::fake_quantize", "")
                       .typed<at::Tensor(const at::Tensor&, const std::string&, bool, int64_t,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                                         int64_t)>();
  const GroupLayout& l = a.layout;
  const at::Tensor finite = at::isfinite(a.x);
  const at::Tensor clean = at::where(finite, a.x, at::zeros({}, a.x.options()));
  const at::Tensor y = op.call(clean, fmt, true, group_size, scale, std::nullopt, stochastic, seed);
  const at::Tensor bad = nonfinite_blocks(finite, l, {l.rows, l.groups});
  const at::Tensor bad_values =
      bad.repeat_interleave(l.group_size, 1).narrow(1, 0, l.k).reshape(a.x.sizes());
  return at::where(bad_values, at::full({}, NAN, y.options()), y);
}

}  // namespace alphaquant
