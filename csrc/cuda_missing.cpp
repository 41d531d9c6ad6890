// Built only when the CUDA kernels are not: CUDA tensors then get a clear error that says how
// to get the kernels, instead of the dispatcher's generic "could not run" message.
#include <torch/library.h>

namespace {

void no_cuda_kernels(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(), ": this build of alphaquant has no CUDA kernels (torch without CUDA, or no ",
              "CUDA toolkit at build time). Rebuild with CUDA_HOME set and ALPHAQUANT_CUDA=1, or use CPU tensors.");
}

}  // namespace

TORCH_LIBRARY_IMPL(alphaquant, CUDA, m) {
  for (const char* name : {"pack", "unpack", "encode_float", "decode_float", "quantize", "dequantize", "fake_quantize",
                           "linear"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_cuda_kernels>());
  }
}
