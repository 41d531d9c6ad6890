// Gradients of the linear ops (linear, linear_codebook) for every device: y = x @ W.T + b gives
// dx = grad @ W and db = grad summed over the leading dimensions; the packed weight, its scales,
// zero points and code book are constants. In C++ rather than torch.library.register_autograd
// so that a call that needs no gradient (inference under torch.no_grad, which transformers'
// generate uses) goes straight to the kernel: the Python formula cost ~3 us per call even then,
// half of a small layer's call.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>

namespace alphaquant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                          const std::string&, bool, int64_t, int64_t, bool)>&
linear_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("alphaquant::linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                               const std::string&, bool, int64_t, int64_t, bool)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                                          bool)>&
linear_codebook_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("alphaquant::linear_codebook", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                                               bool)>();
  return op;
}

bool wants_grad(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  return at::GradMode::is_enabled() && (x.requires_grad() || (bias.has_value() && bias->requires_grad()));
}

// What backward must give: x's gradient, and the bias's (in the bias's dtype) if it needs one.
void save_grad_needs(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  ctx->saved_data["x_grad"] = x.requires_grad();
  ctx->saved_data["bias_dtype"] =
      bias.has_value() && bias->requires_grad() ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
}

std::optional<at::ScalarType> bias_grad_dtype(AutogradContext* ctx) {
  const int64_t dtype = ctx->saved_data["bias_dtype"].toInt();
  return dtype >= 0 ? std::optional<at::ScalarType>(static_cast<at::ScalarType>(dtype)) : std::nullopt;
}

// grad summed over every leading dimension, in float32, returned in the bias's dtype.
at::Tensor bias_grad(const at::Tensor& grad, at::ScalarType bias_dtype) {
  return grad.reshape({-1, grad.size(-1)}).sum(0, false, at::kFloat).to(bias_dtype);
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                            const std::optional<at::Tensor>& zero_point, const std::optional<at::Tensor>& bias,
                            const std::string& fmt, bool symmetric, int64_t group_size, int64_t k, bool validate) {
    ctx->save_for_backward({packed, scale, zero_point.value_or(at::Tensor())});
    ctx->saved_data["fmt"] = std::string(fmt);
    ctx->saved_data["symmetric"] = symmetric;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["k"] = k;
    save_grad_needs(ctx, x, bias);
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_op().call(x, packed, scale, zero_point, bias, fmt, symmetric, group_size, k, validate);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x, grad_bias;
    if (ctx->saved_data["x_grad"].toBool()) {
      const std::optional<at::Tensor> zero = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
      // the forward call already checked these scales (or its caller chose not to)
      const at::Tensor w = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("alphaquant::dequantize", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                 const std::string&, bool, int64_t, int64_t, at::ScalarType, bool)>()
                               .call(saved[0], saved[1], zero, ctx->saved_data["fmt"].toStringRef(),
                                     ctx->saved_data["symmetric"].toBool(), ctx->saved_data["group_size"].toInt(),
                                     ctx->saved_data["k"].toInt(), grad.scalar_type(), false);
      grad_x = grad.matmul(w);
    }
    if (const auto dtype = bias_grad_dtype(ctx)) grad_bias = bias_grad(grad, *dtype);
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), grad_bias,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class LinearCodebookFunction : public torch::autograd::Function<LinearCodebookFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                            const at::Tensor& codebook, const std::optional<at::Tensor>& bias, int64_t group_size,
                            int64_t k, bool validate) {
    ctx->save_for_backward({packed, scale, codebook});
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["k"] = k;
    save_grad_needs(ctx, x, bias);
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_codebook_op().call(x, packed, scale, codebook, bias, group_size, k, validate);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x, grad_bias;
    if (ctx->saved_data["x_grad"].toBool()) {
      const at::Tensor w = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("alphaquant::dequantize_codebook", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                 int64_t, at::ScalarType, bool)>()
                               .call(saved[0], saved[1], saved[2], ctx->saved_data["group_size"].toInt(),
                                     ctx->saved_data["k"].toInt(), grad.scalar_type(), false);
      grad_x = grad.matmul(w);
    }
    if (const auto dtype = bias_grad_dtype(ctx)) grad_bias = bias_grad(grad, *dtype);
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), grad_bias, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                           const std::optional<at::Tensor>& zero_point, const std::optional<at::Tensor>& bias,
                           const std::string& fmt, bool symmetric, int64_t group_size, int64_t k, bool validate) {
  if (!wants_grad(x, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_op().call(x, packed, scale, zero_point, bias, fmt, symmetric, group_size, k, validate);
  }
  return LinearFunction::apply(x, packed, scale, zero_point, bias, fmt, symmetric, group_size, k, validate);
}

at::Tensor linear_codebook_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                    const at::Tensor& codebook, const std::optional<at::Tensor>& bias,
                                    int64_t group_size, int64_t k, bool validate) {
  if (!wants_grad(x, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_codebook_op().call(x, packed, scale, codebook, bias, group_size, k, validate);
  }
  return LinearCodebookFunction::apply(x, packed, scale, codebook, bias, group_size, k, validate);
}

}  // namespace

TORCH_LIBRARY_IMPL(alphaquant, Autograd, m) {
  m.impl("linear", &linear_autograd);
  m.impl("linear_codebook", &linear_codebook_autograd);
}

}  // namespace alphaquant
