// Every op of the native API, in one place. Kernels register per device from csrc/cpu/ and
// csrc/cuda/; fake (meta) kernels live in alphaquant/ops.py. Formats and layouts: see
// csrc/include/alphaquant/formats.h.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"

namespace {
// alphaquant._C.cpu_isa(): the instruction set the CPU kernels that dispatch at run time use
// (csrc/cpu/cpu_isa.h). A module function, not an op: it takes no tensors.
PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(alphaquant::cpu_isa_name(alphaquant::chosen_cpu_isa()).c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

// alphaquant._C.cpu_bf16_dot(): whether the CPU linear op multiplies bf16 activations (up to 16
// rows) with AVX-512 BF16 dot products here (csrc/cpu/linear_bf16_dot.h).
PyObject* cpu_bf16_dot(PyObject*, PyObject*) {
  try {
    return PyBool_FromLong(alphaquant::bf16_dot_usable(alphaquant::chosen_cpu_isa()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyMethodDef module_methods[] = {{"cpu_isa", cpu_isa, METH_NOARGS, "instruction set of the CPU kernels"},
                                {"cpu_bf16_dot", cpu_bf16_dot, METH_NOARGS, "bf16 dot products on the CPU"},
                                {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// Importing alphaquant._C only has to load this library; the ops register themselves below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  PyObject* module = PyModule_Create(&module_def);
#ifdef ALPHAQUANT_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(alphaquant, m) {
  // codes: [..., k] uint8 (each < 2^bits) -> [..., ceil(k*bits/8)] uint8 bit stream per row.
  m.def("pack(Tensor codes, int bits) -> Tensor");
  // packed: [..., ceil(k*bits/8)] uint8 -> [..., k] uint8 codes.
  m.def("unpack(Tensor packed, int bits, int k) -> Tensor");
  // x: float -> one uint8 code per value of a float format (scale 1, no packing).
  m.def("encode_float(Tensor x, str fmt) -> Tensor");
  // codes: uint8 -> float values of a float format, in `dtype`.
  m.def("decode_float(Tensor codes, str fmt, ScalarType dtype) -> Tensor");
  // x: [..., k] float -> (packed [..., ceil(k*bits/8)] uint8, scale [..., groups] f32,
  // zero_point [..., groups] f32 for asymmetric ints else [0]). Scales are computed from
  // min/max unless given (static). group_size: > 0 groups, 0 per-channel, -1 per-tensor.
  // Block-scaled formats (formats.h): scales are uint8 E8M0 (MX) or E4M3 (nvfp4) bytes. nvfp4's
  // float32 global scale [1] travels as zero_point, in and out of every op: it has no zero point,
  // and one more argument on every schema would serve one format.
  m.def(
      "quantize(Tensor x, str fmt, bool symmetric, int group_size, Tensor? scale, Tensor? zero_point, "
      "bool stochastic, int seed) -> (Tensor, Tensor, Tensor)");
  // packed -> [..., k] in `dtype`. validate: check every scale (finite, > 0) and zero point
  // (finite) as it is read and raise on a bad one; False skips the check (and on CUDA the device
  // sync it costs) for callers that validated their scales once, such as QuantLinear.
  m.def(
      "dequantize(Tensor packed, Tensor scale, Tensor? zero_point, str fmt, bool symmetric, int group_size, "
      "int k, ScalarType dtype, bool validate=True) -> Tensor");
  // quantize + dequantize in one pass; same shape and dtype as x.
  m.def(
      "fake_quantize(Tensor x, str fmt, bool symmetric, int group_size, Tensor? scale, Tensor? zero_point, "
      "bool stochastic, int seed) -> Tensor");
  // y = x @ dequantize(weight).T + bias. x: [..., k] float, weight packed: [n, ceil(k*bits/8)],
  // scale/zero_point: [n, groups] (or [1, 1] per-tensor). Returns [..., n] in x's dtype.
  // validate: as for dequantize. Gradients (csrc/linear_autograd.cpp) flow to x and bias only.
  m.def(
      "linear(Tensor x, Tensor packed, Tensor scale, Tensor? zero_point, Tensor? bias, str fmt, bool symmetric, "
      "int group_size, int k, bool validate=True) -> Tensor");

  // (sum of x^2, sum of (x - dequantize(packed))^2) as float64 [2] on the CPU: the error of a
  // quantized tensor against its source x [..., k] in one pass, without a decoded copy. packed,
  // scale and zero_point as for dequantize, with x's leading dimensions.
  m.def(
      "quantization_error(Tensor x, Tensor packed, Tensor scale, Tensor? zero_point, str fmt, bool symmetric, "
      "int group_size) -> Tensor");

  // Learned code books (lut4, formats.h: LearnedCodebook). The table is a tensor argument rather
  // than a format name: it is fitted per weight, so no fixed format can name it, and a format
  // string plus a table would let the two disagree. packed: [..., ceil(k/2)] uint8 4-bit codes;
  // scale: [..., groups] as for dequantize (no zero point); codebook: [16] for the tensor or
  // [..., 16] per row (packed.shape[:-1] + [16]), any float dtype (fp16 or fp32 storage).
  // validate: check every scale (finite, > 0) and every code book value (finite).
  m.def(
      "dequantize_codebook(Tensor packed, Tensor scale, Tensor codebook, int group_size, int k, ScalarType dtype, "
      "bool validate=True) -> Tensor");
  // y = x @ dequantize_codebook(weight).T + bias. x: [..., k] float, packed: [n, ceil(k/2)],
  // scale: [n, groups] (or [1, 1]), codebook: [16] or [n, 16]. Returns [..., n] in x's dtype.
  // Gradients (csrc/linear_autograd.cpp) flow to x and bias only.
  m.def(
      "linear_codebook(Tensor x, Tensor packed, Tensor scale, Tensor codebook, Tensor? bias, int group_size, int k, "
      "bool validate=True) -> Tensor");

  // Embedding lookup from a packed table (csrc/embedding.cpp): indices: int64/int32 of any shape,
  // each in [0, rows); packed: [rows, ceil(k*bits/8)] with its scale/zero_point as for dequantize.
  // Returns indices.shape + [k] in `dtype`; only the looked-up rows are decoded.
  m.def(
      "embedding(Tensor indices, Tensor packed, Tensor scale, Tensor? zero_point, str fmt, bool symmetric, "
      "int group_size, int k, ScalarType dtype, bool validate=True) -> Tensor");
  // The same for a learned code book table (lut4): codebook [16] or [rows, 16].
  m.def(
      "embedding_codebook(Tensor indices, Tensor packed, Tensor scale, Tensor codebook, int group_size, int k, "
      "ScalarType dtype, bool validate=True) -> Tensor");

  // The int8-activation path of the CPU linear op (csrc/cpu/int8_act_layout.h; CPU only). A packed
  // weight [n, k] (as for dequantize) whose values are an integer grid (int1..int8, mxint8,
  // fp4_e2m1, mxfp4_e2m1, fp6_e2m3, mxfp6_e2m3: csrc/cpu/int8_act_grid.h), group_size a multiple
  // of 32, 0 or -1 -> (codes uint8 [ceil(n/16), ceil(k/32), 16*32*sbits/8], params float32
  // [ceil(n/16), groups, 2, 16]): its CPU layout, sbits = 2, 4 or 8 for codes of 1-2, 3-4, 5-8 bits.
  m.def(
      "int8_act_layout(Tensor packed, Tensor scale, Tensor? zero_point, str fmt, bool symmetric, int group_size, "
      "int k) -> (Tensor, Tensor)");
  // The inverse of int8_act_layout's codes: the packed rows uint8 [n, ceil(k*bits/8)] of the `fmt`
  // weight [n, k] whose layout codes are given (exact, but for E2M3's -0, which comes back as +0).
  m.def("int8_act_unlayout(Tensor codes, str fmt, int n, int k) -> Tensor");
  // y = x @ W.T + bias with x [..., k] quantized to int8 per block of 32 values (the quantize op's
  // symmetric "int8", group 32) and integer dot products; W given by int8_act_layout of a `fmt`
  // weight. Returns [..., n] in x's dtype. No gradient (QuantLinear trains through linear).
  m.def(
      "linear_int8_act(Tensor x, Tensor codes, Tensor params, Tensor? bias, str fmt, int group_size, int n, "
      "int k) -> Tensor");
}
