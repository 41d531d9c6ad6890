// Which instruction set the CPU kernels that dispatch at run time use: the best this CPU has,
// or a lower one named by ALPHAQUANT_CPU_ISA (portable, avx2, avx512_vnni) so that tests and
// benchmarks can run every path on one machine.
#pragma once

#include <string>

namespace alphaquant {

enum class CpuIsa { kPortable = 0, kAvx2 = 1, kAvx512Vnni = 2 };

// The best instruction set of this CPU (CPUID, checked once).
CpuIsa best_cpu_isa();
// best_cpu_isa(), lowered to ALPHAQUANT_CPU_ISA when that is set (read at every call; naming an
// instruction set the CPU lacks gives the best it has below it). Raises on an unknown name.
CpuIsa chosen_cpu_isa();
std::string cpu_isa_name(CpuIsa isa);
// Whether the bf16-activation dot products (linear_bf16_dot.h) run: the CPU has AVX-512
// F/BW/VL/DQ/VBMI/BF16 and `isa` (the one chosen for the call) is avx512_vnni.
bool bf16_dot_usable(CpuIsa isa);

}  // namespace alphaquant
