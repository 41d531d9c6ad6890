// quantization_error for devices without a fused kernel (CUDA): the device's dequantize kernel,
// then the two sums in double. The CPU has a fused kernel (csrc/cpu/quantization_error_cpu.cpp).
#include <torch/library.h>

#include "alphaquant/arg_checks.h"

namespace alphaquant {
namespace {

[[maybe_unused]] at::Tensor quantization_error_by_dequantize(const at::Tensor& x, const at::Tensor& packed,
                                                             const at::Tensor& scale,
                                                             const std::optional<at::Tensor>& zero_point,
                                                             const std::string& fmt, bool symmetric,
                                                             int64_t group_size) {
  static auto dequantize = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("alphaquant::dequantize", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                 const std::string&, bool, int64_t, int64_t, at::ScalarType, bool)>();
  const ErrorArgs e = prepare_quantization_error(x, packed, scale, zero_point, fmt, symmetric, group_size);
  const at::Tensor xf = e.x.to(at::kFloat);
  const at::Tensor d = xf - dequantize.call(packed, scale, zero_point, fmt, symmetric, group_size, x.size(-1),
                                            at::kFloat, true);
  return at::stack({xf.to(at::kDouble).square().sum(), d.to(at::kDouble).square().sum()}).cpu();
}

}  // namespace
}  // namespace alphaquant

#ifdef ALPHAQUANT_WITH_CUDA
TORCH_LIBRARY_IMPL(alphaquant, CUDA, m) { m.impl("quantization_error", &alphaquant::quantization_error_by_dequantize); }
#endif
