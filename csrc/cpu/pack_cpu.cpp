// pack / unpack of integer codes on the CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "alphaquant/arg_checks.h"
#include "alphaquant/bitstream.h"

namespace alphaquant {
namespace {

at::Tensor pack_cpu(const at::Tensor& codes_in, int64_t bits) {
  check_pack_args("pack", codes_in, bits);
  const at::Tensor codes = codes_in.contiguous();
  const int64_t k = codes.size(-1), rows = codes.numel() / k;
  const int64_t row_bytes = packed_row_bytes(k, static_cast<int>(bits));
  auto out_shape = codes.sizes().vec();
  out_shape.back() = row_bytes;
  at::Tensor out = at::empty(out_shape, codes.options());
  const uint8_t* src = codes.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  dispatch_bits(static_cast<int>(bits), [&]<int BITS>() {
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) pack_run<BITS>(dst + r * row_bytes, src + r * k, k);
    });
  });
  return out;
}

at::Tensor unpack_cpu(const at::Tensor& packed_in, int64_t bits, int64_t k) {
  check_unpack_args("unpack", packed_in, bits, k);
  const at::Tensor packed = packed_in.contiguous();
  const int64_t row_bytes = packed.size(-1), rows = packed.numel() / row_bytes;
  auto out_shape = packed.sizes().vec();
  out_shape.back() = k;
  at::Tensor out = at::empty(out_shape, packed.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  dispatch_bits(static_cast<int>(bits), [&]<int BITS>() {
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) unpack_run<BITS>(src + r * row_bytes, dst + r * k, k);
    });
  });
  return out;
}

}  // namespace
}  // namespace alphaquant

TORCH_LIBRARY_IMPL(alphaquant, CPU, m) {
  m.impl("pack", &alphaquant::pack_cpu);
  m.impl("unpack", &alphaquant::unpack_cpu);
}
