// Registration of the CPU ops whose kernel files are compiled in two variants (cpu_variant.h):
// each call runs the AVX2/FMA/F16C variant on a CPU that has them (and ALPHAQUANT_CPU_ISA does
// not ask for the portable path), the x86-64 baseline variant otherwise. The build defines
// ALPHAQUANT_AVX2_VARIANTS when it compiles the AVX2 variants (x86-64, ALPHAQUANT_NO_AVX2 unset).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "cpu/cpu_isa.h"

// The ops' entry points, declared once per variant namespace.
#define AQ_DECLARE_CPU_KERNELS(NS)                                                                                  \
  namespace alphaquant::NS {                                                                                        \
  at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,                     \
                        const std::optional<at::Tensor>& zero_point, const std::optional<at::Tensor>& bias,         \
                        const std::string& fmt, bool symmetric, int64_t group_size, int64_t k, bool validate);      \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x, const std::string& fmt,          \
                                                              bool symmetric, int64_t group_size,                   \
                                                              const std::optional<at::Tensor>& scale,               \
                                                              const std::optional<at::Tensor>& zero_point,          \
                                                              bool stochastic, int64_t seed);                       \
  at::Tensor fake_quantize_cpu(const at::Tensor& x, const std::string& fmt, bool symmetric, int64_t group_size,     \
                               const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& zero_point, \
                               bool stochastic, int64_t seed);                                                      \
  at::Tensor dequantize_cpu(const at::Tensor& packed, const at::Tensor& scale,                                      \
                            const std::optional<at::Tensor>& zero_point, const std::string& fmt, bool symmetric,    \
                            int64_t group_size, int64_t k, at::ScalarType dtype, bool validate);                    \
  at::Tensor dequantize_codebook_cpu(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& codebook, \
                                     int64_t group_size, int64_t k, at::ScalarType dtype, bool validate);           \
  at::Tensor linear_codebook_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,            \
                                 const at::Tensor& codebook, const std::optional<at::Tensor>& bias,                 \
                                 int64_t group_size, int64_t k, bool validate);                                     \
  at::Tensor quantization_error_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,         \
                                    const std::optional<at::Tensor>& zero_point, const std::string& fmt,            \
                                    bool symmetric, int64_t group_size);                                            \
  }

AQ_DECLARE_CPU_KERNELS(baseline)
#if defined(ALPHAQUANT_AVX2_VARIANTS)
AQ_DECLARE_CPU_KERNELS(avx2)
#endif

namespace alphaquant {
namespace {

// Read at every call (chosen_cpu_isa raises on an unknown ALPHAQUANT_CPU_ISA, built variants or not).
bool use_avx2_variants() { return chosen_cpu_isa() >= CpuIsa::kAvx2; }

// Dispatch<F, BASELINE, AVX2>::call: the same arguments to the variant this CPU runs.
template <class F, F* BASELINE, F* AVX2>
struct Dispatch;

template <class R, class... A, R (*BASELINE)(A...), R (*AVX2)(A...)>
struct Dispatch<R(A...), BASELINE, AVX2> {
  static R call(A... args) {
    if (use_avx2_variants() && AVX2 != BASELINE) return AVX2(std::forward<A>(args)...);
    return BASELINE(std::forward<A>(args)...);
  }
};

#if defined(ALPHAQUANT_AVX2_VARIANTS)
#define AQ_DISPATCH(fn) &Dispatch<decltype(baseline::fn), &baseline::fn, &avx2::fn>::call
#else
#define AQ_DISPATCH(fn) &Dispatch<decltype(baseline::fn), &baseline::fn, &baseline::fn>::call
#endif

}  // namespace
}  // namespace alphaquant

TORCH_LIBRARY_IMPL(alphaquant, CPU, m) {
  using namespace alphaquant;
  m.impl("linear", AQ_DISPATCH(linear_cpu));
  m.impl("quantize", AQ_DISPATCH(quantize_cpu));
  m.impl("fake_quantize", AQ_DISPATCH(fake_quantize_cpu));
  m.impl("dequantize", AQ_DISPATCH(dequantize_cpu));
  m.impl("dequantize_codebook", AQ_DISPATCH(dequantize_codebook_cpu));
  m.impl("linear_codebook", AQ_DISPATCH(linear_codebook_cpu));
  m.impl("quantization_error", AQ_DISPATCH(quantization_error_cpu));
}
