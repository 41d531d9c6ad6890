// linear_int8_act: y = x @ W.T + bias with x quantized to int8 per block of 32 values (symmetric,
// scale max|x| / 127, the arithmetic of the quantize op for "int8") and W in the CPU layout of
// int8_act_layout. The dot products run in integers (int8_act_layout.h); the kernel is chosen at
// run time by the CPU's instruction set (cpu_isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <vector>

#include "alphaquant/arg_checks.h"
#include "alphaquant/quant_math.h"
#include "cpu/cpu_isa.h"
#include "cpu/int8_act_grid.h"
#include "cpu/int8_act_layout.h"
#include "cpu/int8_act_quantize_x.h"

namespace alphaquant {
namespace {

using namespace int8_act;

// Activation codes, block scales and group offsets (Problem's xq, xscale, xoffset) of x [m, k]
// (float32, bf16 or fp16, read as it is: no converted copy; int8_act_quantize_x.h). Returns false
// if x holds NaN or Inf. avx2: full blocks in AVX2 registers (the caller's instruction set).
// half_groups: groups of 16 values (two per block; blocks_per_group unused).
template <class T>
bool quantize_activations(const T* x, int64_t m, int64_t k, int64_t kblocks, int64_t groups,
                          int64_t blocks_per_group, bool half_groups, bool avx2, int8_t* xq, float* xscale,
                          float* xoffset) {
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    bool bad = false;
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t g = 0; g < groups; ++g) xoffset[r * groups + g] = 0.0f;
      for (int64_t b = 0; b < kblocks; ++b) {
        const T* xb = x + r * k + b * kBlock;
        const int64_t len = k - b * kBlock < kBlock ? k - b * kBlock : kBlock;
        int8_t* qb = xq + r * kblocks * kBlock + b * kBlock;
        int32_t sum = 0;
        float scale;
#if defined(__x86_64__)
        if (avx2 && len == kBlock)
          scale = quantize_block32_avx2(xb, qb, sum, bad);
        else
#endif
          scale = quantize_block_scalar(xb, len, qb, sum, bad);
        xscale[r * kblocks + b] = scale;
        if (half_groups) {
          int32_t first = 0;
          for (int64_t i = 0; i < kHalfBlock && i < len; ++i) first += qb[i];
          xoffset[r * groups + 2 * b] += scale * static_cast<float>(first);
          if (2 * b + 1 < groups) xoffset[r * groups + 2 * b + 1] += scale * static_cast<float>(sum - first);
        } else {
          xoffset[r * groups + b / blocks_per_group] += scale * static_cast<float>(sum);
        }
      }
    }
    if (bad) nonfinite = true;
  });
  return !nonfinite;
}

at::Tensor linear_int8_act_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& params,
                               const std::optional<at::Tensor>& bias, const std::string& fmt, int64_t group_size,
                               int64_t n, int64_t k) {
  const char* op = "linear_int8_act";
  check_floating(op, x);
  // the weight's format: its width gives the layout's fields, a float grid its table (int8_act_grid.h)
  const bool is_int = fmt.rfind("int", 0) == 0 || fmt == "mxint8";
  const FormatSpec spec = parse_format(fmt, /*symmetric=*/!is_int || fmt == "mxint8");
  const Grid grid = grid_of(spec);
  TORCH_CHECK_VALUE(grid.ok, "alphaquant.", op, ": fmt must be a format int8_act_layout takes (int1..int8, mxint8, ",
                    "fp4_e2m1, mxfp4_e2m1, nvfp4, fp6_e2m3, mxfp6_e2m3); got ", fmt);
  const int64_t bits = spec.bits;
  TORCH_CHECK_VALUE(n > 0 && k > 0, "alphaquant.", op, ": n and k must be > 0; got n=", n, ", k=", k);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == k, "alphaquant.", op, ": x must be [..., k=", k, "]; got ",
                    x.sizes());
  TORCH_CHECK_VALUE(group_size >= -1, "alphaquant.", op, ": group_size must be > 0, 0 or -1; got ", group_size);
  const bool one_group = group_size <= 0 || group_size >= k;
  const bool half_groups = !one_group && group_size == kHalfBlock;
  TORCH_CHECK_VALUE(one_group || half_groups || group_size % kBlock == 0, "alphaquant.", op,
                    ": group_size must be a multiple of ", kBlock, ", ", kHalfBlock, ", or 0 / -1; got ", group_size);
  const int sbits = storage_bits(static_cast<int>(bits));
  const int64_t kblocks = ceil_div(k, kBlock), tiles = ceil_div(n, kTileRows);
  const int64_t groups = one_group ? 1 : ceil_div(k, group_size);
  const int64_t blocks_per_group = one_group ? kblocks : group_size / kBlock;  // 0 with half_groups
  TORCH_CHECK_VALUE(codes.scalar_type() == at::kByte && codes.dim() == 3 && codes.size(0) == tiles &&
                        codes.size(1) == kblocks && codes.size(2) == tile_block_bytes(sbits),
                    "alphaquant.", op, ": codes must be uint8 [", tiles, ", ", kblocks, ", ", tile_block_bytes(sbits),
                    "] (int8_act_layout of a ", fmt, " weight [", n, ", ", k, "]); got ", codes.scalar_type(),
                    " ", codes.sizes());
  TORCH_CHECK_VALUE((params.scalar_type() == at::kFloat || params.scalar_type() == at::kHalf) && params.dim() == 4 &&
                        params.size(0) == tiles && params.size(1) == groups &&
                        (params.size(2) == 1 || params.size(2) == 2) && params.size(3) == kTileRows &&
                        (params.size(2) == 1 || params.scalar_type() == at::kFloat) && (is_int || params.size(2) == 1),
                    "alphaquant.", op, ": params must be float32 or float16 [", tiles, ", ", groups, ", 1 or 2, ",
                    kTileRows, "] (from int8_act_layout; 2 and float32 only for integers with zero points); got ",
                    params.scalar_type(), " ", params.sizes());
  check_same_device(op, x, "x", codes, "codes");
  check_same_device(op, x, "x", params, "params");
  std::optional<at::Tensor> bias_f;
  if (bias) {
    check_same_device(op, x, "x", *bias, "bias");
    check_floating(op, *bias);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "alphaquant.", op, ": bias must be [", n, "]; got ",
                      bias->sizes());
    bias_f = bias->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = n;
  const at::Tensor x2d = x.reshape({-1, k}).contiguous();
  const int64_t m = x2d.size(0);
  at::Tensor y = at::empty({m, n}, x2d.options().dtype(at::kFloat));
  if (m == 0) return y.to(x.scalar_type()).reshape(out_shape);

  // Activation codes and scales in this thread's scratch (reused across calls: a decode step makes
  // hundreds of small calls, where allocations would cost more than the work).
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xscale, xoffset;
  xq.resize(m * kblocks * kBlock);
  xscale.resize(m * kblocks);
  xoffset.resize(m * groups);
  const CpuIsa isa = chosen_cpu_isa();  // once per call: it reads the environment
  const bool avx2 = isa >= CpuIsa::kAvx2;
  const auto quantize_x = [&](const auto* xp) {
    return quantize_activations(xp, m, k, kblocks, groups, blocks_per_group, half_groups, avx2, xq.data(),
                                xscale.data(), xoffset.data());
  };
  bool finite_x;
  switch (x2d.scalar_type()) {
    case at::kBFloat16: finite_x = quantize_x(x2d.data_ptr<at::BFloat16>()); break;
    case at::kHalf: finite_x = quantize_x(x2d.data_ptr<at::Half>()); break;
    default: finite_x = quantize_x(x2d.data_ptr<float>());
  }
  TORCH_CHECK_VALUE(finite_x, "alphaquant.", op, ": x holds NaN or Inf, which int8 activations cannot hold "
                    "(the float-activation linear op passes them through)");

  const at::Tensor codes_c = codes.contiguous(), params_c = params.contiguous();
  std::array<uint8_t, 16> table16{};
  std::copy(grid.u.begin(), grid.u.begin() + 16, table16.begin());
  const bool needs_table = !grid.identity && sbits == 4;  // byte fields hold grid values already
  Problem p{};
  p.codes = codes_c.data_ptr<uint8_t>();
  p.params = params_c.data_ptr();
  p.params_f16 = params_c.scalar_type() == at::kHalf;
  p.pcount = params_c.size(2);
  // without zero points o = s * qoff: qmin of the symmetric integer format, -bias of a float grid
  p.qoff = is_int ? static_cast<float>(int_range(spec.bits, true).qmin) : -grid.bias;
  p.out_scale = 1.0f / grid.mult;  // a power of two: exact
  p.xq = xq.data();
  p.xscale = xscale.data();
  p.xoffset = xoffset.data();
  p.bias = bias_f ? bias_f->data_ptr<float>() : nullptr;
  p.table16 = needs_table ? table16.data() : nullptr;
  p.y = y.data_ptr<float>();
  p.m = m, p.n = n, p.kblocks = kblocks, p.groups = groups, p.blocks_per_group = blocks_per_group;
  p.half_groups = half_groups;
  p.sbits = sbits;
  auto kernel = &run_tiles_portable;
#if defined(__x86_64__)
  switch (isa) {
    case CpuIsa::kAvx512Vnni: kernel = &run_tiles_avx512_vnni; break;
    case CpuIsa::kAvx2: kernel = &run_tiles_avx2; break;
    default: break;
  }
#endif
  // Threads only for tasks of at least kMinDotsPerTask integer dot-product instructions (about a
  // microsecond): below that a small layer at one token runs faster on the calling thread
  // (SmolLM2's 1536x576 at one token: 9.1 us with 64K, 6.9 us with 4K; 1K is no faster).
  constexpr int64_t kMinDotsPerTask = 4096;
  const int64_t per_tile = kblocks * 8 * m;
  at::parallel_for(0, tiles, std::max<int64_t>(1, kMinDotsPerTask / per_tile),
                   [&](int64_t t0, int64_t t1) { kernel(p, t0, t1); });
  if (xq.capacity() > (size_t{16} << 20)) {  // a large batch's scratch is not kept for the next call
    std::vector<int8_t>().swap(xq);
    std::vector<float>().swap(xscale);
  }
  return y.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace
}  // namespace alphaquant

TORCH_LIBRARY_IMPL(alphaquant, CPU, m) { m.impl("linear_int8_act", &alphaquant::linear_int8_act_cpu); }
