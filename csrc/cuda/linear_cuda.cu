// Low-bit linear layer on CUDA: y = x @ dequantize(W).T + bias.
//
// Up to 16 rows of x (decode): a memory-bound GEMV. One warp per output feature walks its
// packed weight row in blocks of 8 codes (lanes take consecutive blocks, so a warp's loads are
// contiguous), dequantizes in registers and accumulates against every row of x, which stays
// in L1/L2. The weight is read once, packed. More rows: the weight is dequantized to x's dtype
// and multiplied by cuBLAS (tensor cores); a fused tensor-core kernel is future work.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "alphaquant/arg_checks.h"
#include "alphaquant/quant_math.h"
#include "cuda/cuda_utils.cuh"

namespace alphaquant {

constexpr int kMaxGemvRows = 16;
constexpr int kWarpsPerBlock = 8;

struct GemvParams {
  FormatSpec fmt;
  GroupLayout l;  // of the weight [n, k]
  int64_t m;
  int64_t row_bytes;
  const float* scale;
  const float* zero;
  const float* bias;
  bool aligned;          // k % 8 == 0 with aligned bases
  bool block_one_scale;  // every block of 8 codes lies in one group
  int* err;              // kErrBadScale lands here; nullptr: do not check the scales
};

template <class CODEC, int BITS, class T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, T* __restrict__ y, GemvParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t j = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32;
  if (j >= p.l.rows) return;  // whole warps leave together
  const int64_t k = p.l.k;
  const uint8_t* wrow = w + j * p.row_bytes;
  const float qmin = p.fmt.qmin();
  float acc[kMaxGemvRows];
#pragma unroll
  for (int r = 0; r < kMaxGemvRows; ++r) acc[r] = 0.0f;
  bool bad_scale = false;
  for (int64_t kb = 8 * lane; kb < k; kb += 8 * 32) {
    const int n = block_len(k - kb);
    const uint64_t bits = load_block_bits<BITS>(wrow + kb / 8 * BITS, block_bytes(n, BITS), p.aligned);
    float wv[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t si = p.l.scale_index(j, p.block_one_scale ? kb : min(kb + i, k - 1));
      const uint8_t c = unpack1<BITS>(bits, i);
      const float s = p.scale[si], z = p.zero ? p.zero[si] : 0.0f;
      bad_scale |= !valid_scale(s, z);
      if constexpr (std::is_void_v<CODEC>) {
        wv[i] = i < n ? dequantize_int_code(c, s, z, qmin) : 0.0f;
      } else {
        wv[i] = i < n ? CODEC::decode(c) * s : 0.0f;
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxGemvRows; ++r) {
      if (r < p.m) {
        float xv[8];
        load8(x + r * k + kb, xv, n, p.aligned);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[r] = fmaf(wv[i], xv[i], acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kMaxGemvRows; ++r) {
    if (r < p.m) {
      float v = acc[r];
      for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) y[r * p.l.rows + j] = from_float<T>(v + (p.bias ? p.bias[j] : 0.0f));
    }
  }
  if (bad_scale && p.err) atomicOr(p.err, kErrBadScale);
}

namespace {

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const std::optional<at::Tensor>& zero_point, const std::optional<at::Tensor>& bias,
                       const std::string& fmt, bool symmetric, int64_t group_size, int64_t k, bool validate) {
  const c10::cuda::CUDAGuard guard(x.device());
  LinearArgs a = prepare_linear(x, packed, scale, zero_point, bias, fmt, symmetric, group_size, k, validate);
  const int64_t m = a.x2d.size(0), n = a.layout.rows;
  if (m > kMaxGemvRows) {
    const at::Tensor w = dequantize_weight(a, x.scalar_type());
    std::optional<at::Tensor> b;
    if (a.bias) b = a.bias->to(x.scalar_type());
    return at::linear(a.x2d, w, b).reshape(a.out_shape);
  }
  at::Tensor y = at::empty({m, n}, a.x2d.options());
  const GroupLayout& l = a.layout;
  // The error flag costs an allocation and, below, a device sync: only when validating.
  at::Tensor err = a.validate ? at::zeros({1}, x.options().dtype(at::kInt)) : at::Tensor();
  GemvParams p{.fmt = a.fmt,
               .l = l,
               .m = m,
               .row_bytes = a.packed.size(1),
               .scale = a.scale.data_ptr<float>(),
               .zero = a.zero ? a.zero->data_ptr<float>() : nullptr,
               .bias = a.bias ? a.bias->data_ptr<float>() : nullptr,
               .aligned = false,
               .block_one_scale = l.per_tensor || l.group_size >= l.k || l.group_size % 8 == 0,
               .err = a.validate ? err.data_ptr<int>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_cuda", [&] {
    const scalar_t* xp = a.x2d.data_ptr<scalar_t>();
    p.aligned = k % 8 == 0 && (reinterpret_cast<uintptr_t>(xp) & 15) == 0 &&
                (reinterpret_cast<uintptr_t>(a.packed.data_ptr()) & 15) == 0;
    dispatch_format(a.fmt, [&]<class CODEC, int BITS>() {
      gemv_kernel<CODEC, BITS, scalar_t><<<ceil_div(n, kWarpsPerBlock), kWarpsPerBlock * 32, 0, current_stream()>>>(
          xp, a.packed.data_ptr<uint8_t>(), y.data_ptr<scalar_t>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (a.validate) {
    const int flags = err.item<int>();
    if (flags) raise_kernel_error("linear", flags, a.fmt);
  }
  return y.reshape(a.out_shape);
}

}  // namespace
}  // namespace alphaquant

TORCH_LIBRARY_IMPL(alphaquant, CUDA, m) { m.impl("linear", &alphaquant::linear_cuda); }
