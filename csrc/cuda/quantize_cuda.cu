// quantize / dequantize / fake_quantize on CUDA.
//
// Dynamic scales, groups on 8-code boundaries (the common case): a team of lanes owns a group,
// reads it once to find min/max (shuffle reduction), then reads it again from L1/L2 to quantize
// and pack, so DRAM sees one read of the input and one write of the output. Groups that do not
// start on 8-code boundaries get their scales from a separate stats pass first. Given scales
// (static quantization) need no reduction: one thread per block of 8 codes.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "alphaquant/arg_checks.h"
#include "alphaquant/bitstream.h"
#include "alphaquant/quant_math.h"
#include "cuda/cuda_utils.cuh"

namespace alphaquant {

struct QuantParams {
  FormatSpec fmt;
  GroupLayout l;
  const float* scale_in;  // per-group scales to use (given or from the stats pass)
  const float* zero_in;
  bool check_scale;       // validate scale_in (given by the caller) and flag kErrBadScale
  float* scale_out;       // dynamic: where the kernel writes scales (nullptr: do not)
  float* zero_out;
  bool stochastic;
  uint64_t seed;
  bool aligned;  // k % 8 == 0 and 16-byte aligned bases: vector loads and word stores are safe
  int64_t row_bytes;
  int* err;
};

// Quantize one block of 8 values and either pack it (FAKE = false) or write it back dequantized.
template <class CODEC, int BITS, class T, bool FAKE>
__device__ __forceinline__ void emit_block(const QuantParams& p, const float (&v)[8], int n, int64_t row, int64_t k,
                                           const ScaleZero (&sz)[8], uint8_t* packed, T* out) {
  uint8_t c[8];
  const float qmin = p.fmt.qmin(), qmax = p.fmt.qmax();
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t noise = p.stochastic ? random_bits(p.seed, static_cast<uint64_t>(row * p.l.k + k + i)) : 0u;
    if constexpr (std::is_void_v<CODEC>) {
      c[i] = quantize_int_code(v[i], sz[i].scale, sz[i].zero, qmin, qmax, noise, p.stochastic);
    } else {
      c[i] = quantize_float_code<CODEC>(v[i], sz[i].scale, noise, p.stochastic, p.fmt.mx);
    }
    if (i >= n) c[i] = 0;
  }
  if constexpr (FAKE) {
    float d[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if constexpr (std::is_void_v<CODEC>) {
        d[i] = dequantize_int_code(c[i], sz[i].scale, sz[i].zero, qmin);
      } else {
        d[i] = CODEC::decode(c[i]) * sz[i].scale;
      }
    }
    store8(out + row * p.l.k + k, d, n, p.aligned);
  } else {
    store_block_bits<BITS>(packed + row * p.row_bytes + k / 8 * BITS, pack8<BITS>(c), block_bytes(n, BITS), p.aligned);
  }
}

__device__ __forceinline__ GroupStats team_reduce(GroupStats s, int team) {
  for (int off = team / 2; off > 0; off /= 2) {
    GroupStats o;
    o.mn = __shfl_xor_sync(0xffffffffu, s.mn, off, team);
    o.mx = __shfl_xor_sync(0xffffffffu, s.mx, off, team);
    o.nonfinite = __shfl_xor_sync(0xffffffffu, static_cast<int>(s.nonfinite), off, team);
    s.merge(o);
  }
  return s;
}

// Dynamic scales, groups starting on multiples of 8: a team of `team` lanes per group.
template <class CODEC, int BITS, class T, bool FAKE>
__global__ void quantize_groups_kernel(const T* __restrict__ x, uint8_t* __restrict__ packed, T* __restrict__ out,
                                       QuantParams p, int team) {
  const int lane = threadIdx.x % team;
  const int teams_per_warp = 32 / team;
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  const int64_t ngroups = p.l.rows * p.l.groups;
  // Every lane of a warp runs the same number of iterations, so full-warp shuffles are safe.
  for (int64_t base = warp * teams_per_warp; base < ngroups; base += warps * teams_per_warp) {
    const int64_t gi = base + (threadIdx.x % 32) / team;
    const bool valid = gi < ngroups;
    const int64_t row = valid ? gi / p.l.groups : 0;
    const int64_t g0 = valid ? p.l.group_begin(gi % p.l.groups) : 0;
    const int64_t g1 = valid ? p.l.group_end(gi % p.l.groups) : 0;
    const T* xrow = x + row * p.l.k;
    GroupStats s;
    for (int64_t k = g0 + 8 * lane; k < g1; k += 8 * team) {
      float v[8];
      const int n = block_len(g1 - k);
      load8(xrow + k, v, n, p.aligned);
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < n) s.add(v[i]);
    }
    s = team_reduce(s, team);
    if (!valid) continue;
    const ScaleZero sz = group_scale(p.fmt, s);
    if (lane == 0) {
      if (p.scale_out) p.scale_out[gi] = sz.scale;
      if (p.zero_out) p.zero_out[gi] = sz.zero;
      if (s.nonfinite && !p.fmt.holds_nonfinite()) atomicOr(p.err, kErrNonFinite);
    }
    ScaleZero szs[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) szs[i] = sz;
    for (int64_t k = g0 + 8 * lane; k < g1; k += 8 * team) {
      float v[8];
      const int n = block_len(g1 - k);
      load8(xrow + k, v, n, p.aligned);
      emit_block<CODEC, BITS, T, FAKE>(p, v, n, row, k, szs, packed, out);
    }
  }
}

// Scales per group for layouts the fused kernel cannot take (groups not on 8-code boundaries).
template <class T>
__global__ void group_stats_kernel(const T* __restrict__ x, QuantParams p, float* scale, float* zero) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  const int64_t ngroups = p.l.rows * p.l.groups;
  for (int64_t gi = warp; gi < ngroups; gi += int64_t(gridDim.x) * blockDim.x / 32) {
    const int64_t row = gi / p.l.groups, g0 = p.l.group_begin(gi % p.l.groups);
    const int64_t g1 = p.l.group_end(gi % p.l.groups);
    GroupStats s;
    for (int64_t k = g0 + lane; k < g1; k += 32) s.add(to_float(x[row * p.l.k + k]));
    s = team_reduce(s, 32);
    if (lane == 0) {
      const ScaleZero sz = group_scale(p.fmt, s);
      scale[gi] = sz.scale;
      zero[gi] = sz.zero;
    }
  }
}

// Known scales: one thread per block of 8 codes.
template <class CODEC, int BITS, class T, bool FAKE>
__global__ void quantize_blocks_kernel(const T* __restrict__ x, uint8_t* __restrict__ packed, T* __restrict__ out,
                                       QuantParams p) {
  const int64_t blocks_per_row = (p.l.k + 7) / 8;
  bool bad = false, bad_scale = false;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < p.l.rows * blocks_per_row;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = t / blocks_per_row, k = (t % blocks_per_row) * 8;
    const int n = block_len(p.l.k - k);
    float v[8];
    load8(x + row * p.l.k + k, v, n, p.aligned);
    ScaleZero sz[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t si = p.l.scale_index(row, min(k + i, p.l.k - 1));
      sz[i] = {.scale = p.scale_in[si], .zero = p.zero_in ? p.zero_in[si] : 0.0f};
      if (i < n) bad |= !finite(v[i]);
      bad_scale |= !valid_scale(sz[i].scale, sz[i].zero);
    }
    emit_block<CODEC, BITS, T, FAKE>(p, v, n, row, k, sz, packed, out);
  }
  if (bad && !p.fmt.holds_nonfinite()) atomicOr(p.err, kErrNonFinite);
  if (bad_scale && p.check_scale) atomicOr(p.err, kErrBadScale);
}

template <class CODEC, int BITS, class T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ packed, T* __restrict__ out, QuantParams p) {
  const int64_t blocks_per_row = (p.l.k + 7) / 8;
  const float qmin = p.fmt.qmin();
  bool bad_scale = false;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < p.l.rows * blocks_per_row;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = t / blocks_per_row, k = (t % blocks_per_row) * 8;
    const int n = block_len(p.l.k - k);
    const uint64_t bits =
        load_block_bits<BITS>(packed + row * p.row_bytes + k / 8 * BITS, block_bytes(n, BITS), p.aligned);
    float d[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t si = p.l.scale_index(row, min(k + i, p.l.k - 1));
      const uint8_t c = unpack1<BITS>(bits, i);
      const float s = p.scale_in[si], z = p.zero_in ? p.zero_in[si] : 0.0f;
      bad_scale |= !valid_scale(s, z);
      if constexpr (std::is_void_v<CODEC>) {
        d[i] = dequantize_int_code(c, s, z, qmin);
      } else {
        d[i] = CODEC::decode(c) * s;
      }
    }
    store8(out + row * p.l.k + k, d, n, p.aligned);
  }
  if (bad_scale && p.check_scale) atomicOr(p.err, kErrBadScale);
}

namespace {

bool all_aligned(int64_t k, std::initializer_list<const void*> ptrs) {
  if (k % 8 != 0) return false;
  for (const void* q : ptrs)
    if (q && (reinterpret_cast<uintptr_t>(q) & 15) != 0) return false;
  return true;
}

int team_size(int64_t group_size) {
  const int64_t blocks = ceil_div(group_size, 8);
  int t = 1;
  while (t < blocks && t < 32) t *= 2;
  return t;
}

// Shared driver of quantize (FAKE=false: writes packed) and fake_quantize (FAKE=true: writes out).
// Returns the kernels' error flags (the callers raise them).
template <bool FAKE>
int run_quantize(QuantizeArgs& a, uint8_t* packed, at::Tensor& out, float* scale_out, float* zero_out,
                  bool stochastic, int64_t seed) {
  const GroupLayout& l = a.layout;
  at::Tensor err = at::zeros({1}, a.x.options().dtype(at::kInt));
  QuantParams p{.fmt = a.fmt,
                .l = l,
                .scale_in = nullptr,
                .zero_in = nullptr,
                .check_scale = false,
                .scale_out = nullptr,
                .zero_out = nullptr,
                .stochastic = stochastic,
                .seed = static_cast<uint64_t>(seed),
                .aligned = false,
                .row_bytes = packed_row_bytes(l.k, a.fmt.bits),
                .err = err.data_ptr<int>()};
  const bool dynamic = !a.scale.has_value();
  const bool fused = dynamic && (l.group_size % 8 == 0 || l.group_size >= l.k);
  at::Tensor stats_scale, stats_zero;
  if (dynamic && !fused) {
    stats_scale = at::empty({l.rows * l.groups}, a.x.options().dtype(at::kFloat));
    stats_zero = at::empty({l.rows * l.groups}, a.x.options().dtype(at::kFloat));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "quantize_cuda", [&] {
    const scalar_t* x = a.x.data_ptr<scalar_t>();
    scalar_t* o = FAKE ? out.data_ptr<scalar_t>() : nullptr;
    p.aligned = all_aligned(l.k, {x, packed, o});
    dispatch_format(a.fmt, [&]<class CODEC, int BITS>() {
      if (fused) {
        p.scale_out = scale_out;
        p.zero_out = zero_out;
        const int team = team_size(l.group_size);
        const int64_t warps = ceil_div(l.rows * l.groups, 32 / team);
        quantize_groups_kernel<CODEC, BITS, scalar_t, FAKE>
            <<<grid_for(warps * 32, 256), 256, 0, current_stream()>>>(x, packed, o, p, team);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      if (dynamic) {
        group_stats_kernel<scalar_t><<<grid_for(l.rows * l.groups * 32, 256), 256, 0, current_stream()>>>(
            x, p, stats_scale.data_ptr<float>(), stats_zero.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        p.scale_in = stats_scale.data_ptr<float>();
        p.zero_in = stats_zero.data_ptr<float>();
      } else {
        p.scale_in = a.scale->data_ptr<float>();
        p.zero_in = a.zero ? a.zero->data_ptr<float>() : nullptr;
        p.check_scale = true;
      }
      quantize_blocks_kernel<CODEC, BITS, scalar_t, FAKE>
          <<<grid_for(l.rows * ceil_div(l.k, 8), 256), 256, 0, current_stream()>>>(x, packed, o, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (dynamic && !fused) {
    if (scale_out) at::from_blob(scale_out, {l.rows * l.groups}, stats_scale.options()).copy_(stats_scale);
    if (zero_out) at::from_blob(zero_out, {l.rows * l.groups}, stats_zero.options()).copy_(stats_zero);
  }
  return err.item<int>();  // one sync: errors must surface as exceptions
}

// Min, max and non-finite flag of a whole tensor (per-tensor dynamic scales) with one device
// sync and no float copy of the input: min/max propagate NaN and show Inf, so finite results
// mean every value is finite. Only input that holds NaN/Inf for an fp8 format takes a second,
// masked reduction.
GroupStats tensor_stats_cuda(const at::Tensor& x) {
  auto [mn, mx] = at::aminmax(x);
  const at::Tensor both = at::stack({mn, mx}).to(at::kFloat).cpu();
  GroupStats s;
  s.mn = both[0].item<float>();
  s.mx = both[1].item<float>();
  if (finite(s.mn) && finite(s.mx)) return s;
  s.nonfinite = true;
  auto [fmn, fmx] = at::aminmax(at::where(at::isfinite(x), x, at::zeros({}, x.options())));
  const at::Tensor fboth = at::stack({fmn, fmx}).to(at::kFloat).cpu();
  s.mn = fboth[0].item<float>();
  s.mx = fboth[1].item<float>();
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x, const std::string& fmt,
                                                              bool symmetric, int64_t group_size,
                                                              const std::optional<at::Tensor>& scale,
                                                              const std::optional<at::Tensor>& zero_point,
                                                              bool stochastic, int64_t seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  QuantizeArgs a = prepare_quantize("quantize", x, fmt, symmetric, group_size, scale, zero_point, &tensor_stats_cuda);
  QuantizeOutputs o = allocate_quantize_outputs(a);
  at::Tensor none;
  const int err =
      run_quantize<false>(a, o.packed.data_ptr<uint8_t>(), none, o.scale_dst, o.zero_dst, stochastic, seed);
  if (err && is_mx_nan_block_case(a, err)) return mx_quantize_nan_blocks(a, fmt, group_size, scale, stochastic, seed);
  if (err) raise_kernel_error("quantize", err, a.fmt);
  return {o.packed, returned_scale(a, o.scale), o.zero};
}

at::Tensor fake_quantize_cuda(const at::Tensor& x, const std::string& fmt, bool symmetric, int64_t group_size,
                              const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& zero_point,
                              bool stochastic, int64_t seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  QuantizeArgs a =
      prepare_quantize("fake_quantize", x, fmt, symmetric, group_size, scale, zero_point, &tensor_stats_cuda);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int err = run_quantize<true>(a, nullptr, out, nullptr, nullptr, stochastic, seed);
  if (err && is_mx_nan_block_case(a, err)) {
    return mx_fake_quantize_nan_blocks(a, fmt, group_size, scale, stochastic, seed);
  }
  if (err) raise_kernel_error("fake_quantize", err, a.fmt);
  return out;
}

at::Tensor dequantize_cuda(const at::Tensor& packed, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                           const std::string& fmt, bool symmetric, int64_t group_size, int64_t k, at::ScalarType dtype,
                           bool validate) {
  check_output_dtype("dequantize", dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  DequantizeArgs a =
      prepare_dequantize("dequantize", packed, scale, zero_point, fmt, symmetric, group_size, k, validate);
  at::Tensor out = at::empty(a.out_shape, packed.options().dtype(dtype));
  // The error flag costs an allocation and, below, a device sync: only when validating.
  at::Tensor err = a.validate ? at::zeros({1}, packed.options().dtype(at::kInt)) : at::Tensor();
  QuantParams p{.fmt = a.fmt,
                .l = a.layout,
                .scale_in = a.scale.data_ptr<float>(),
                .zero_in = a.zero ? a.zero->data_ptr<float>() : nullptr,
                .check_scale = a.validate,
                .scale_out = nullptr,
                .zero_out = nullptr,
                .stochastic = false,
                .seed = 0,
                .aligned = false,
                .row_bytes = a.packed.size(-1),
                .err = a.validate ? err.data_ptr<int>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_cuda", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    p.aligned = all_aligned(a.layout.k, {a.packed.data_ptr(), o});
    dispatch_format(a.fmt, [&]<class CODEC, int BITS>() {
      dequantize_kernel<CODEC, BITS, scalar_t>
          <<<grid_for(a.layout.rows * ceil_div(a.layout.k, 8), 256), 256, 0, current_stream()>>>(
              a.packed.data_ptr<uint8_t>(), o, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (a.validate) {
    const int flags = err.item<int>();
    if (flags) raise_kernel_error("dequantize", flags, a.fmt);
  }
  return out;
}

}  // namespace
}  // namespace alphaquant

TORCH_LIBRARY_IMPL(alphaquant, CUDA, m) {
  m.impl("quantize", &alphaquant::quantize_cuda);
  m.impl("fake_quantize", &alphaquant::fake_quantize_cuda);
  m.impl("dequantize", &alphaquant::dequantize_cuda);
}
