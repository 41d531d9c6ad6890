// Argument checking and preparation shared by the CPU and CUDA launchers, so both devices
// accept and reject exactly the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "alphaquant/dispatch.h"

namespace alphaquant {

// Error bits a kernel raises in its flag word; the launcher turns them into exceptions.
constexpr int kErrNonFinite = 1;  // NaN/Inf input for a format that cannot hold it
constexpr int kErrBadScale = 2;   // a given scale that is not finite and > 0

struct QuantizeArgs {
  at::Tensor x;  // contiguous input
  FormatSpec fmt;
  GroupLayout layout;
  std::vector<int64_t> scale_shape;
  std::optional<at::Tensor> scale;  // float32 contiguous, given or computed per tensor
  std::optional<at::Tensor> zero;   // float32 contiguous (asymmetric integers only)
};

// Checks the input of quantize/fake_quantize; computes per-tensor scales on the host side.
QuantizeArgs prepare_quantize(const char* op, const at::Tensor& x, const std::string& fmt, bool symmetric,
                              int64_t group_size, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& zero_point);

struct DequantizeArgs {
  at::Tensor packed;  // contiguous [..., ceil(k*bits/8)]
  FormatSpec fmt;
  GroupLayout layout;
  at::Tensor scale;                 // float32 contiguous
  std::optional<at::Tensor> zero;   // float32 contiguous (asymmetric integers only)
  std::vector<int64_t> out_shape;
};

DequantizeArgs prepare_dequantize(const char* op, const at::Tensor& packed, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& zero_point, const std::string& fmt,
                                  bool symmetric, int64_t group_size, int64_t k);

void check_floating(const char* op, const at::Tensor& x);
void check_same_device(const char* op, const at::Tensor& a, const at::Tensor& b, const char* name);
void check_output_dtype(const char* op, at::ScalarType dtype);
void raise_kernel_error(const char* op, int flags, const FormatSpec& fmt);
std::string format_name(const FormatSpec& fmt);

}  // namespace alphaquant

namespace alphaquant {

// pack/unpack: bits in 1..8, uint8 codes below 2^bits, non-empty.
void check_pack_args(const char* op, const at::Tensor& codes, int64_t bits);
void check_unpack_args(const char* op, const at::Tensor& packed, int64_t bits, int64_t k);
// encode_float/decode_float.
void check_decode_args(const char* op, const at::Tensor& codes, const FormatSpec& fmt);

}  // namespace alphaquant

namespace alphaquant {

struct LinearArgs {
  at::Tensor x2d;  // [m, k], contiguous, x's dtype
  at::Tensor packed;  // [n, ceil(k*bits/8)] contiguous
  FormatSpec fmt;
  GroupLayout layout;  // of the weight [n, k]
  at::Tensor scale;    // float32 [n, groups] or [1, 1]
  std::optional<at::Tensor> zero;
  std::optional<at::Tensor> bias;  // float32 [n]
  std::vector<int64_t> out_shape;  // x.shape[:-1] + [n]
  std::string fmt_name;            // as given, to call other ops with
  int64_t group_size_arg;
};

LinearArgs prepare_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          const std::optional<at::Tensor>& zero_point, const std::optional<at::Tensor>& bias,
                          const std::string& fmt, bool symmetric, int64_t group_size, int64_t k);

// The weight of a linear op (rows [n0, n0 + rows), default all) dequantized to `dtype` through
// the dispatcher (any device).
at::Tensor dequantize_weight(const LinearArgs& a, at::ScalarType dtype, int64_t n0 = 0, int64_t rows = -1);

}  // namespace alphaquant
