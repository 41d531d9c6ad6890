// Argument checks and preparation shared by the CPU and CUDA launchers, so that both devices
// accept and reject exactly the same inputs with the same messages (the fake kernels in
// alphaquant/ops.py check the same rules for the meta device and torch.compile).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "alphaquant/dispatch.h"
#include "alphaquant/format_and_layout.h"
#include "alphaquant/quant_math.h"

namespace alphaquant {

// Error bits a kernel raises in its flag word; the launcher turns them into exceptions.
constexpr int kErrNonFinite = 1;  // NaN/Inf input for a format that cannot hold it
constexpr int kErrBadScale = 2;   // a scale that is not finite and > 0, or a zero point that is not finite
constexpr int kErrBadCodebook = 4;  // a learned code book value that is not finite

void check_floating(const char* op, const at::Tensor& x);
void check_output_dtype(const char* op, at::ScalarType dtype);
// `t` (called `name`) must be on the device of `ref` (called `ref_name`).
void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name);
// k values per row, `rows` rows: k > 0 and the sizes derived from it fit in int64.
void check_row_length(const char* op, int64_t k, int64_t rows);
[[noreturn]] void raise_kernel_error(const char* op, int flags, const FormatSpec& fmt);
// The same for the learned code book ops (kErrBadScale, kErrBadCodebook).
[[noreturn]] void raise_codebook_error(const char* op, int flags);

// pack/unpack: bits in 1..8, uint8 codes below 2^bits, non-empty.
void check_pack_args(const char* op, const at::Tensor& codes, int64_t bits);
void check_unpack_args(const char* op, const at::Tensor& packed, int64_t bits, int64_t k);
// encode_float/decode_float: a float format, uint8 codes of its width.
void check_decode_args(const char* op, const at::Tensor& codes, const FormatSpec& fmt);

// ---------------------------------------------------------------- quantize, fake_quantize

// Statistics of a whole tensor (per-tensor dynamic scales), computed by each device its own way.
using TensorStatsFn = GroupStats (*)(const at::Tensor& x);

struct QuantizeArgs {
  at::Tensor x;  // contiguous input
  FormatSpec fmt;
  GroupLayout layout;
  std::vector<int64_t> scale_shape;
  std::optional<at::Tensor> scale;  // float32 contiguous, given or computed per tensor
  std::optional<at::Tensor> zero;   // float32 contiguous (asymmetric integers only)
  // nvfp4 only: the E4M3 scale bytes and the float32 [1] global scale that quantize returns;
  // `scale` above holds the float32 block scales they decode to.
  std::optional<at::Tensor> scale_codes;
  std::optional<at::Tensor> global_scale;
};

// Checks the input of quantize/fake_quantize; per-tensor dynamic scales come from `tensor_stats`.
QuantizeArgs prepare_quantize(const char* op, const at::Tensor& x, const std::string& fmt, bool symmetric,
                              int64_t group_size, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& zero_point, TensorStatsFn tensor_stats);

// The three outputs of quantize, and where a kernel writes the scales it computes (nullptr
// where they are known already and were copied into the outputs).
struct QuantizeOutputs {
  at::Tensor packed;  // uint8 [..., packed_row_bytes(k, bits)]
  at::Tensor scale;   // float32, scale_shape
  at::Tensor zero;    // float32, scale_shape for asymmetric ints, else [0]
  float* scale_dst;
  float* zero_dst;
};

QuantizeOutputs allocate_quantize_outputs(const QuantizeArgs& a);

// MX scales (formats.h): E8M0 bytes <-> the float32 powers of two the kernels compute with.
at::Tensor mx_scale_values(const at::Tensor& codes, const FormatSpec& f);
at::Tensor mx_scale_codes(const at::Tensor& scale, const FormatSpec& f);
// NVFP4 scales (formats.h): E4M3 bytes and the global scale -> float32 block scales.
at::Tensor nvfp4_scale_values(const at::Tensor& codes, const at::Tensor& global_scale);
// The scale a quantize op returns: float32, E8M0 bytes for MX formats, E4M3 bytes for nvfp4.
at::Tensor returned_scale(const QuantizeArgs& a, const at::Tensor& scale);

// MX blocks holding NaN or Inf get the NaN scale (csrc/mx_nan_blocks.cpp): when a quantize or
// fake_quantize kernel flags only non-finite input for an MX format, its launcher returns these.
bool is_mx_nan_block_case(const QuantizeArgs& a, int flags);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mx_quantize_nan_blocks(
    const QuantizeArgs& a, const std::string& fmt, int64_t group_size, const std::optional<at::Tensor>& scale,
    bool stochastic, int64_t seed);
at::Tensor mx_fake_quantize_nan_blocks(const QuantizeArgs& a, const std::string& fmt, int64_t group_size,
                                       const std::optional<at::Tensor>& scale, bool stochastic, int64_t seed);

// ---------------------------------------------------------------- dequantize

struct DequantizeArgs {
  at::Tensor packed;  // contiguous [..., packed_row_bytes(k, bits)]
  FormatSpec fmt;
  GroupLayout layout;
  at::Tensor scale;                // float32 contiguous
  std::optional<at::Tensor> zero;  // float32 contiguous (asymmetric integers only)
  std::vector<int64_t> out_shape;
  bool validate;                   // check every scale and zero point read (kErrBadScale)
  // Block-scaled formats read as bytes (keep_scale_bytes, CPU): `scale` stays undefined; a kernel
  // reads the E8M0 / E4M3 bytes and looks each up in scale_table (its float32 scale; nvfp4: byte /
  // global scale): a quarter of the float32 reads and no decoded copy per call.
  std::optional<at::Tensor> scale_codes;  // uint8, scale's shape, contiguous
  at::Tensor global_scale;                // float32 [1]
  std::array<float, 256> scale_table{};
};

DequantizeArgs prepare_dequantize(const char* op, const at::Tensor& packed, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& zero_point, const std::string& fmt,
                                  bool symmetric, int64_t group_size, int64_t k, bool validate,
                                  bool keep_scale_bytes = false);

// ---------------------------------------------------------------- quantization_error

// x [..., k] and its quantized form (packed [..., row bytes] with scale / zero_point as for
// dequantize) of the same leading shape.
struct ErrorArgs {
  at::Tensor x;  // contiguous, x's dtype
  DequantizeArgs w;
};

ErrorArgs prepare_quantization_error(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                     const std::optional<at::Tensor>& zero_point, const std::string& fmt,
                                     bool symmetric, int64_t group_size);

// ---------------------------------------------------------------- linear

struct LinearArgs {
  at::Tensor x2d;      // [m, k], contiguous, x's dtype
  at::Tensor packed;   // [n, packed_row_bytes(k, bits)] contiguous
  FormatSpec fmt;
  GroupLayout layout;  // of the weight [n, k]
  at::Tensor scale;    // float32 [n, groups] or [1, 1]; undefined when scale_codes holds them
  std::optional<at::Tensor> zero;
  std::optional<at::Tensor> bias;  // float32 [n]
  std::vector<int64_t> out_shape;  // x.shape[:-1] + [n]
  std::string fmt_name;            // as given, to call other ops with
  int64_t group_size_arg;
  bool validate;
  std::optional<at::Tensor> scale_codes;  // block-scaled formats on the CPU: scale bytes (DequantizeArgs)
  at::Tensor global_scale;
  std::array<float, 256> scale_table{};

  // The float32 scale of group index si.
  float scale_at(int64_t si) const {
    return scale_codes ? scale_table[scale_codes->data_ptr<uint8_t>()[si]] : scale.data_ptr<float>()[si];
  }
};

LinearArgs prepare_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          const std::optional<at::Tensor>& zero_point, const std::optional<at::Tensor>& bias,
                          const std::string& fmt, bool symmetric, int64_t group_size, int64_t k, bool validate);

// The weight of a linear op (rows [n0, n0 + rows), default all) dequantized to `dtype` through
// the dispatcher (any device), validating its scales when the linear op does.
at::Tensor dequantize_weight(const LinearArgs& a, at::ScalarType dtype, int64_t n0 = 0, int64_t rows = -1);

// ---------------------------------------------------------------- learned code books (lut4)

struct CodebookArgs {
  at::Tensor packed;    // contiguous [..., packed_row_bytes(k, 4)]
  GroupLayout layout;   // of the values, viewed as [rows, k]
  at::Tensor scale;     // float32 contiguous
  at::Tensor codebook;  // float32 contiguous: [16], or [rows * 16] with per_row
  bool per_row;         // one code book per row (else one for the whole tensor)
  std::vector<int64_t> out_shape;
  bool validate;        // check every scale (kErrBadScale) and code book value (kErrBadCodebook)

  // The 16 values of `row`'s code book.
  const float* table(int64_t row) const {
    return codebook.data_ptr<float>() + (per_row ? row * LearnedCodebook::kSize : 0);
  }
};

CodebookArgs prepare_dequantize_codebook(const char* op, const at::Tensor& packed, const at::Tensor& scale,
                                         const at::Tensor& codebook, int64_t group_size, int64_t k, bool validate);

struct CodebookLinearArgs {
  at::Tensor x2d;                  // [m, k], contiguous, x's dtype
  CodebookArgs w;                  // the weight [n, k]
  std::optional<at::Tensor> bias;  // float32 [n]
  std::vector<int64_t> out_shape;  // x.shape[:-1] + [n]
  int64_t group_size_arg;
};

CodebookLinearArgs prepare_linear_codebook(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                           const at::Tensor& codebook, const std::optional<at::Tensor>& bias,
                                           int64_t group_size, int64_t k, bool validate);

// Rows [n0, n0 + rows) (default all) of the weight of linear_codebook dequantized to `dtype`
// through the dispatcher (any device), validating as the linear op does.
at::Tensor dequantize_codebook_weight(const CodebookLinearArgs& a, at::ScalarType dtype, int64_t n0 = 0,
                                      int64_t rows = -1);

}  // namespace alphaquant
