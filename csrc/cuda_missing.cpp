// Built only when the CUDA kernels are not: CUDA tensors then get a clear error that says how
// to get the kernels, instead of the dispatcher's generic "could not run" message.
#include <torch/library.h>

#include <string>

namespace {

void no_cuda_kernels(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  std::string name = op.schema().name();
  name.replace(name.find("::"), 2, ".");
  // A CUDA tensor mixed with tensors of another device also lands here: report that first, as
  // the CUDA build would.
  const auto& args = op.schema().arguments();
  const auto first = stack->end() - static_cast<std::ptrdiff_t>(args.size());
  const c10::Argument* cuda_arg = nullptr;
  c10::Device cuda_device(c10::kCUDA);
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = first[static_cast<std::ptrdiff_t>(i)];
    if (v.isTensor() && v.toTensor().defined() && v.toTensor().is_cuda()) {
      cuda_arg = &args[i];
      cuda_device = v.toTensor().device();
      break;
    }
  }
  for (size_t i = 0; cuda_arg != nullptr && i < args.size(); ++i) {
    const c10::IValue& v = first[static_cast<std::ptrdiff_t>(i)];
    if (v.isTensor() && v.toTensor().defined()) {
      TORCH_CHECK_VALUE(v.toTensor().is_cuda(), name, ": ", args[i].name(), " is on ", v.toTensor().device(),
                        " but ", cuda_arg->name(), " is on ", cuda_device,
                        "; every tensor argument must be on the same device");
    }
  }
  TORCH_CHECK(false, name, ": this build of alphaquant has no CUDA kernels (torch without CUDA, or no ",
              "CUDA toolkit at build time). Rebuild with CUDA_HOME set and ALPHAQUANT_CUDA=1, or use CPU tensors.");
}

}  // namespace

TORCH_LIBRARY_IMPL(alphaquant, CUDA, m) {
  for (const char* name : {"pack", "unpack", "encode_float", "decode_float", "quantize", "dequantize", "fake_quantize",
                           "linear", "dequantize_codebook", "linear_codebook", "embedding", "embedding_codebook",
                           "quantization_error"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_cuda_kernels>());
  }
}
