// Raw float-format codecs on the CPU: float <-> one code per byte, scale 1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>

#include "alphaquant/arg_checks.h"
#include "cpu/decode_table.h"

namespace alphaquant {
namespace {

at::Tensor encode_float_cpu(const at::Tensor& x_in, const std::string& fmt_name) {
  const FormatSpec fmt = parse_format(fmt_name, true);
  TORCH_CHECK_VALUE(!fmt.is_block_scaled(), "alphaquant: ", fmt_name, " is a block-scaled format; encode_float/",
                    "decode_float take its element format (", format_name(fmt.element()), "), quantize/dequantize ",
                    "take ", fmt_name);
  check_decode_args("encode_float", at::empty({0}, at::kByte), fmt);
  check_floating("encode_float", x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kByte));
  uint8_t* dst = out.data_ptr<uint8_t>();
  std::atomic<int> err{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "encode_float_cpu", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    dispatch_format(fmt, [&]<class CODEC, int BITS>() {
      if constexpr (!std::is_void_v<CODEC>) {
        at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) {
          bool bad = false;
          for (int64_t i = begin; i < end; ++i) {
            const float v = static_cast<float>(src[i]);
            bad |= !finite(v);
            dst[i] = static_cast<uint8_t>(CODEC::encode(v));
          }
          if (bad && !fmt.holds_nonfinite()) err |= kErrNonFinite;
        });
      }
    });
  });
  if (err) raise_kernel_error("encode_float", err, fmt);
  return out;
}

at::Tensor decode_float_cpu(const at::Tensor& codes_in, const std::string& fmt_name, at::ScalarType dtype) {
  const FormatSpec fmt = parse_format(fmt_name, true);
  TORCH_CHECK_VALUE(!fmt.is_block_scaled(), "alphaquant: ", fmt_name, " is a block-scaled format; encode_float/",
                    "decode_float take its element format (", format_name(fmt.element()), "), quantize/dequantize ",
                    "take ", fmt_name);
  check_decode_args("decode_float", codes_in, fmt);
  check_output_dtype("decode_float", dtype);
  const at::Tensor codes = codes_in.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  const uint8_t* src = codes.data_ptr<uint8_t>();
  const float* table = decode_table(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "decode_float_cpu", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, codes.numel(), 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) dst[i] = static_cast<scalar_t>(table[src[i]]);
    });
  });
  return out;
}

}  // namespace
}  // namespace alphaquant

TORCH_LIBRARY_IMPL(alphaquant, CPU, m) {
  m.impl("encode_float", &alphaquant::encode_float_cpu);
  m.impl("decode_float", &alphaquant::decode_float_cpu);
}
