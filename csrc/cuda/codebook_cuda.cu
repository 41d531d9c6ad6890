// Learned code books (lut4, formats.h: LearnedCodebook) on CUDA: dequantize_codebook and
// linear_codebook. value = table[code] * scale, the 16-entry table of the tensor or of the row.
//
// dequantize: one thread per block of 8 codes, as the dequantize op; a thread reads its row's
// table entries through the read-only cache (16 floats a row, shared by every thread of the
// row, so they stay cached). linear, up to 16 rows of x: the GEMV of linear_cuda.cu, one warp per
// output feature, with the feature's table copied to shared memory first: 16 floats in 16
// distinct banks, so the lanes' random lookups never conflict. More rows: dequantize + cuBLAS.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "alphaquant/arg_checks.h"
#include "alphaquant/quant_math.h"
#include "cuda/cuda_utils.cuh"

namespace alphaquant {

namespace codebook_cuda {
constexpr int kBits = LearnedCodebook::kBits;
constexpr int kSize = LearnedCodebook::kSize;
constexpr int kMaxGemvRows = 16;
constexpr int kWarpsPerBlock = 8;
}  // namespace codebook_cuda

struct CodebookParams {
  GroupLayout l;          // of the values [rows, k]
  int64_t row_bytes;
  const float* scale;
  const float* codebook;  // float32 [16], or [rows, 16] with per_row
  bool per_row;
  int64_t codebook_numel;
  bool aligned;           // k % 8 == 0 with 16-byte aligned bases
  int* err;               // kErrBadScale / kErrBadCodebook land here; nullptr: do not check
};

template <class T>
__global__ void dequantize_codebook_kernel(const uint8_t* __restrict__ packed, T* __restrict__ out, CodebookParams p) {
  using namespace codebook_cuda;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  bool bad_codebook = false, bad_scale = false;
  for (int64_t i = tid; i < p.codebook_numel; i += stride) bad_codebook |= !finite(p.codebook[i]);
  const int64_t blocks_per_row = (p.l.k + 7) / 8;
  for (int64_t t = tid; t < p.l.rows * blocks_per_row; t += stride) {
    const int64_t row = t / blocks_per_row, k = (t % blocks_per_row) * 8;
    const int n = block_len(p.l.k - k);
    const uint64_t bits =
        load_block_bits<kBits>(packed + row * p.row_bytes + k / 8 * kBits, block_bytes(n, kBits), p.aligned);
    const float* table = p.codebook + (p.per_row ? row * kSize : 0);
    float d[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float s = p.scale[p.l.scale_index(row, min(k + i, p.l.k - 1))];
      bad_scale |= !valid_scale(s, 0.0f);
      d[i] = __ldg(table + unpack1<kBits>(bits, i)) * s;
    }
    store8(out + row * p.l.k + k, d, n, p.aligned);
  }
  if (p.err && bad_scale) atomicOr(p.err, kErrBadScale);
  if (p.err && bad_codebook) atomicOr(p.err, kErrBadCodebook);
}

template <class T>
__global__ void __launch_bounds__(codebook_cuda::kWarpsPerBlock * 32)
    gemv_codebook_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, T* __restrict__ y,
                         CodebookParams p, int64_t m, const float* __restrict__ bias) {
  using namespace codebook_cuda;
  __shared__ float tables[kWarpsPerBlock][kSize];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t j = blockIdx.x * int64_t(kWarpsPerBlock) + warp;
  if (j >= p.l.rows) return;  // whole warps leave together; the warp's table is its own
  float* table = tables[warp];
  if (lane < kSize) {
    const float v = p.codebook[(p.per_row ? j * kSize : 0) + lane];
    table[lane] = v;
    if (p.err && !finite(v)) atomicOr(p.err, kErrBadCodebook);
  }
  __syncwarp();
  const int64_t k = p.l.k;
  const uint8_t* wrow = w + j * p.row_bytes;
  const bool block_one_scale = p.l.per_tensor || p.l.group_size >= k || p.l.group_size % 8 == 0;
  float acc[kMaxGemvRows];
#pragma unroll
  for (int r = 0; r < kMaxGemvRows; ++r) acc[r] = 0.0f;
  bool bad_scale = false;
  for (int64_t kb = 8 * lane; kb < k; kb += 8 * 32) {
    const int n = block_len(k - kb);
    const uint64_t bits = load_block_bits<kBits>(wrow + kb / 8 * kBits, block_bytes(n, kBits), p.aligned);
    float wv[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float s = p.scale[p.l.scale_index(j, block_one_scale ? kb : min(kb + i, k - 1))];
      bad_scale |= !valid_scale(s, 0.0f);
      wv[i] = i < n ? table[unpack1<kBits>(bits, i)] * s : 0.0f;
    }
#pragma unroll
    for (int r = 0; r < kMaxGemvRows; ++r) {
      if (r < m) {
        float xv[8];
        load8(x + r * k + kb, xv, n, p.aligned);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[r] = fmaf(wv[i], xv[i], acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kMaxGemvRows; ++r) {
    if (r < m) {
      float v = acc[r];
      for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) y[r * p.l.rows + j] = from_float<T>(v + (bias ? bias[j] : 0.0f));
    }
  }
  if (bad_scale && p.err) atomicOr(p.err, kErrBadScale);
}

namespace {

bool aligned16(const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; }  // host side

CodebookParams codebook_params(const CodebookArgs& a, int* err) {
  return {.l = a.layout,
          .row_bytes = a.packed.size(-1),
          .scale = a.scale.data_ptr<float>(),
          .codebook = a.codebook.data_ptr<float>(),
          .per_row = a.per_row,
          .codebook_numel = a.codebook.numel(),
          .aligned = false,
          .err = err};
}

at::Tensor dequantize_codebook_cuda(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& codebook,
                                    int64_t group_size, int64_t k, at::ScalarType dtype, bool validate) {
  check_output_dtype("dequantize_codebook", dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  const CodebookArgs a = prepare_dequantize_codebook("dequantize_codebook", packed, scale, codebook, group_size, k,
                                                     validate);
  at::Tensor out = at::empty(a.out_shape, packed.options().dtype(dtype));
  // The error flag costs an allocation and, below, a device sync: only when validating.
  at::Tensor err = validate ? at::zeros({1}, packed.options().dtype(at::kInt)) : at::Tensor();
  CodebookParams p = codebook_params(a, validate ? err.data_ptr<int>() : nullptr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_codebook_cuda", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    p.aligned = a.layout.k % 8 == 0 && aligned16(a.packed.data_ptr()) && aligned16(o);
    const int64_t blocks = std::max(a.layout.rows * ceil_div(a.layout.k, 8), a.codebook.numel());
    dequantize_codebook_kernel<scalar_t><<<grid_for(blocks, 256), 256, 0, current_stream()>>>(
        a.packed.data_ptr<uint8_t>(), o, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (validate) {
    const int flags = err.item<int>();
    if (flags) raise_codebook_error("dequantize_codebook", flags);
  }
  return out;
}

at::Tensor linear_codebook_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                const at::Tensor& codebook, const std::optional<at::Tensor>& bias, int64_t group_size,
                                int64_t k, bool validate) {
  using namespace codebook_cuda;
  const c10::cuda::CUDAGuard guard(x.device());
  const CodebookLinearArgs a = prepare_linear_codebook(x, packed, scale, codebook, bias, group_size, k, validate);
  const int64_t m = a.x2d.size(0), n = a.w.layout.rows;
  if (m > kMaxGemvRows) {
    const at::Tensor w = dequantize_codebook_weight(a, x.scalar_type());
    std::optional<at::Tensor> b;
    if (a.bias) b = a.bias->to(x.scalar_type());
    return at::linear(a.x2d, w, b).reshape(a.out_shape);
  }
  at::Tensor y = at::empty({m, n}, a.x2d.options());
  at::Tensor err = validate ? at::zeros({1}, x.options().dtype(at::kInt)) : at::Tensor();
  CodebookParams p = codebook_params(a.w, validate ? err.data_ptr<int>() : nullptr);
  const float* b = a.bias ? a.bias->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_codebook_cuda", [&] {
    const scalar_t* xp = a.x2d.data_ptr<scalar_t>();
    p.aligned = k % 8 == 0 && aligned16(xp) && aligned16(a.w.packed.data_ptr());
    gemv_codebook_kernel<scalar_t><<<ceil_div(n, kWarpsPerBlock), kWarpsPerBlock * 32, 0, current_stream()>>>(
        xp, a.w.packed.data_ptr<uint8_t>(), y.data_ptr<scalar_t>(), p, m, b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (validate) {
    const int flags = err.item<int>();
    if (flags) raise_codebook_error("linear_codebook", flags);
  }
  return y.reshape(a.out_shape);
}

}  // namespace
}  // namespace alphaquant

TORCH_LIBRARY_IMPL(alphaquant, CUDA, m) {
  m.impl("dequantize_codebook", &alphaquant::dequantize_codebook_cuda);
  m.impl("linear_codebook", &alphaquant::linear_codebook_cuda);
}
