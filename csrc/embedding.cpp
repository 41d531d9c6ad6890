// Embedding lookup from a packed table: out[i] = dequantize(table row indices[i]).
// Only the looked-up rows are touched: their packed bytes and scales are gathered (a few bytes
// per value) and decoded by the device's dequantize kernel, so a 4-bit table is never expanded
// to float. The same code serves CPU and CUDA tensors (the inner ops dispatch by device).
#include <torch/library.h>

#include "alphaquant/arg_checks.h"

namespace alphaquant {
namespace {

// Integer indices on the table's device, every one in [0, rows). On CUDA the range check
// costs one synchronization: an index out of range would otherwise be a device-side assert
// that poisons the CUDA context.
at::Tensor checked_indices(const char* op, const at::Tensor& indices, const at::Tensor& packed) {
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, "alphaquant.", op,
                   ": indices must be int64 or int32; got ", indices.scalar_type());
  check_same_device(op, packed, "packed", indices, "indices");
  TORCH_CHECK_VALUE(packed.dim() == 2, "alphaquant.", op, ": the packed table must be 2-D [rows, bytes per row]; got ",
                    "shape ", packed.sizes());
  const int64_t rows = packed.size(0);
  at::Tensor flat = indices.reshape({-1}).to(at::kLong);
  if (flat.numel() > 0) {
    auto [lo, hi] = at::aminmax(flat);
    const int64_t low = lo.item<int64_t>(), high = hi.item<int64_t>();
    TORCH_CHECK_INDEX(low >= 0 && high < rows, "alphaquant.", op, ": indices must be in [0, ", rows,
                      ") for a table of ", rows, " rows; got values from ", low, " to ", high);
  }
  return flat;
}

// Rows `flat` of the scales or zero points ([rows, groups]); one per tensor ([1, 1]) serves all.
at::Tensor rows_of(const at::Tensor& t, const at::Tensor& flat, int64_t group_size) {
  return group_size == -1 ? t : t.index_select(0, flat);
}

std::vector<int64_t> output_shape(const at::Tensor& indices, int64_t k) {
  std::vector<int64_t> shape = indices.sizes().vec();
  shape.push_back(k);
  return shape;
}

at::Tensor embedding(const at::Tensor& indices, const at::Tensor& packed, const at::Tensor& scale,
                     const std::optional<at::Tensor>& zero_point, const std::string& fmt, bool symmetric,
                     int64_t group_size, int64_t k, at::ScalarType dtype, bool validate) {
  static auto dequantize = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("alphaquant::dequantize", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                 const std::string&, bool, int64_t, int64_t, at::ScalarType, bool)>();
  check_output_dtype("embedding", dtype);
  const at::Tensor flat = checked_indices("embedding", indices, packed);
  // The whole table's layout is checked (shapes of scales and zero points for its rows).
  const bool nvfp4 =
      prepare_dequantize("embedding", packed, scale, zero_point, fmt, symmetric, group_size, k, false).fmt.nvfp4;
  if (flat.numel() == 0) return at::empty(output_shape(indices, k), packed.options().dtype(dtype));
  std::optional<at::Tensor> zero;
  if (zero_point.has_value() && zero_point->numel() > 0) {
    zero = nvfp4 ? *zero_point : rows_of(*zero_point, flat, group_size);  // nvfp4's: one global scale
  }
  // E4M3 scale bytes are gathered as uint8 (index_select has no float8 kernel everywhere).
  const at::Tensor scale_rows = nvfp4 ? rows_of(scale.view(at::kByte), flat, group_size) : rows_of(scale, flat, group_size);
  at::Tensor out = dequantize.call(packed.index_select(0, flat), scale_rows, zero, fmt, symmetric, group_size, k, dtype,
                                   validate);
  return out.reshape(output_shape(indices, k));
}

at::Tensor embedding_codebook(const at::Tensor& indices, const at::Tensor& packed, const at::Tensor& scale,
                              const at::Tensor& codebook, int64_t group_size, int64_t k, at::ScalarType dtype,
                              bool validate) {
  static auto dequantize = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("alphaquant::dequantize_codebook", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                 int64_t, at::ScalarType, bool)>();
  check_output_dtype("embedding_codebook", dtype);
  const at::Tensor flat = checked_indices("embedding_codebook", indices, packed);
  prepare_dequantize_codebook("embedding_codebook", packed, scale, codebook, group_size, k, false);
  if (flat.numel() == 0) return at::empty(output_shape(indices, k), packed.options().dtype(dtype));
  const at::Tensor table = codebook.dim() == 2 ? codebook.index_select(0, flat) : codebook;
  at::Tensor out = dequantize.call(packed.index_select(0, flat), rows_of(scale, flat, group_size), table, group_size, k,
                                   dtype, validate);
  return out.reshape(output_shape(indices, k));
}

}  // namespace
}  // namespace alphaquant

TORCH_LIBRARY_IMPL(alphaquant, CPU, m) {
  m.impl("embedding", &alphaquant::embedding);
  m.impl("embedding_codebook", &alphaquant::embedding_codebook);
}

#ifdef ALPHAQUANT_WITH_CUDA
TORCH_LIBRARY_IMPL(alphaquant, CUDA, m) {
  m.impl("embedding", &alphaquant::embedding);
  m.impl("embedding_codebook", &alphaquant::embedding_codebook);
}
#endif
