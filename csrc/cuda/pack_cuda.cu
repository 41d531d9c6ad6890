// pack / unpack of integer codes on CUDA: one thread per block of 8 codes (BITS bytes).
#include <torch/library.h>

#include "alphaquant/bitstream.h"
#include "alphaquant/arg_checks.h"
#include "cuda/cuda_utils.cuh"

namespace alphaquant {

template <int BITS>
__global__ void pack_kernel(const uint8_t* __restrict__ codes, uint8_t* __restrict__ out, int64_t rows, int64_t k,
                            int64_t row_bytes) {
  const int64_t blocks_per_row = (k + 7) / 8;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < rows * blocks_per_row;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = t / blocks_per_row, j = t % blocks_per_row;
    const int n = block_len(k - j * 8);
    uint8_t c[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) c[i] = i < n ? codes[row * k + j * 8 + i] : 0;
    store_block<BITS>(out + row * row_bytes + j * BITS, c, n);
  }
}

template <int BITS>
__global__ void unpack_kernel(const uint8_t* __restrict__ packed, uint8_t* __restrict__ out, int64_t rows, int64_t k,
                              int64_t row_bytes) {
  const int64_t blocks_per_row = (k + 7) / 8;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < rows * blocks_per_row;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = t / blocks_per_row, j = t % blocks_per_row;
    const int n = block_len(k - j * 8);
    uint8_t c[8];
    load_block<BITS>(packed + row * row_bytes + j * BITS, c, n);
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < n) out[row * k + j * 8 + i] = c[i];
  }
}

namespace {

at::Tensor pack_cuda(const at::Tensor& codes_in, int64_t bits) {
  check_pack_args("pack", codes_in, bits);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const int64_t k = codes.size(-1), rows = codes.numel() / k;
  const int64_t row_bytes = packed_row_bytes(k, static_cast<int>(bits));
  auto shape = codes.sizes().vec();
  shape.back() = row_bytes;
  at::Tensor out = at::empty(shape, codes.options());
  dispatch_bits(static_cast<int>(bits), [&]<int BITS>() {
    pack_kernel<BITS><<<grid_for(rows * ceil_div(k, 8), 256), 256, 0, current_stream()>>>(
        codes.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), rows, k, row_bytes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor unpack_cuda(const at::Tensor& packed_in, int64_t bits, int64_t k) {
  check_unpack_args("unpack", packed_in, bits, k);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const int64_t row_bytes = packed.size(-1), rows = packed.numel() / row_bytes;
  auto shape = packed.sizes().vec();
  shape.back() = k;
  at::Tensor out = at::empty(shape, packed.options());
  dispatch_bits(static_cast<int>(bits), [&]<int BITS>() {
    unpack_kernel<BITS><<<grid_for(rows * ceil_div(k, 8), 256), 256, 0, current_stream()>>>(
        packed.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), rows, k, row_bytes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace alphaquant

TORCH_LIBRARY_IMPL(alphaquant, CUDA, m) {
  m.impl("pack", &alphaquant::pack_cuda);
  m.impl("unpack", &alphaquant::unpack_cuda);
}
