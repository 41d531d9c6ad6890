// Raw float-format codecs on CUDA: float <-> one code per byte, scale 1.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "alphaquant/arg_checks.h"
#include "cuda/cuda_utils.cuh"

namespace alphaquant {

template <class CODEC, class T>
__global__ void encode_float_kernel(const T* __restrict__ x, uint8_t* __restrict__ out, int64_t n, int* err,
                                    bool holds_nonfinite) {
  bool bad = false;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = to_float(x[i]);
    bad |= !finite(v);
    out[i] = static_cast<uint8_t>(CODEC::encode(v));
  }
  if (bad && !holds_nonfinite) atomicOr(err, kErrNonFinite);
}

template <class CODEC, class T>
__global__ void decode_float_kernel(const uint8_t* __restrict__ codes, T* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = from_float<T>(CODEC::decode(codes[i]));
  }
}

namespace {

at::Tensor encode_float_cuda(const at::Tensor& x_in, const std::string& fmt_name) {
  const FormatSpec fmt = parse_format(fmt_name, true);
  TORCH_CHECK_VALUE(!fmt.is_block_scaled(), "alphaquant: ", fmt_name, " is a block-scaled format; encode_float/",
                    "decode_float take its element format (", format_name(fmt.element()), "), quantize/dequantize ",
                    "take ", fmt_name);
  check_decode_args("encode_float", at::empty({0}, at::kByte), fmt);
  check_floating("encode_float", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor err = at::zeros({1}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "encode_float_cuda", [&] {
    dispatch_format(fmt, [&]<class CODEC, int BITS>() {
      if constexpr (!std::is_void_v<CODEC>) {
        encode_float_kernel<CODEC, scalar_t><<<grid_for(x.numel(), 256), 256, 0, current_stream()>>>(
            x.data_ptr<scalar_t>(), out.data_ptr<uint8_t>(), x.numel(), err.data_ptr<int>(), fmt.holds_nonfinite());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  if (!fmt.holds_nonfinite()) {
    const int flags = err.item<int>();
    if (flags) raise_kernel_error("encode_float", flags, fmt);
  }
  return out;
}

at::Tensor decode_float_cuda(const at::Tensor& codes_in, const std::string& fmt_name, at::ScalarType dtype) {
  const FormatSpec fmt = parse_format(fmt_name, true);
  TORCH_CHECK_VALUE(!fmt.is_block_scaled(), "alphaquant: ", fmt_name, " is a block-scaled format; encode_float/",
                    "decode_float take its element format (", format_name(fmt.element()), "), quantize/dequantize ",
                    "take ", fmt_name);
  check_decode_args("decode_float", codes_in, fmt);
  check_output_dtype("decode_float", dtype);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "decode_float_cuda", [&] {
    dispatch_format(fmt, [&]<class CODEC, int BITS>() {
      if constexpr (!std::is_void_v<CODEC>) {
        decode_float_kernel<CODEC, scalar_t><<<grid_for(codes.numel(), 256), 256, 0, current_stream()>>>(
            codes.data_ptr<uint8_t>(), out.data_ptr<scalar_t>(), codes.numel());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace alphaquant

TORCH_LIBRARY_IMPL(alphaquant, CUDA, m) {
  m.impl("encode_float", &alphaquant::encode_float_cuda);
  m.impl("decode_float", &alphaquant::decode_float_cuda);
}
