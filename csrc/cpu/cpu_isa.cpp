#include "cpu/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>

namespace alphaquant {

CpuIsa best_cpu_isa() {
  static const CpuIsa best = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      return CpuIsa::kAvx512Vnni;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return CpuIsa::kAvx2;
#endif
    return CpuIsa::kPortable;
  }();
  return best;
}

CpuIsa chosen_cpu_isa() {
  const CpuIsa best = best_cpu_isa();
  const char* env = std::getenv("ALPHAQUANT_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string name(env);
  CpuIsa asked;
  if (name == "portable") {
    asked = CpuIsa::kPortable;
  } else if (name == "avx2") {
    asked = CpuIsa::kAvx2;
  } else if (name == "avx512_vnni") {
    asked = CpuIsa::kAvx512Vnni;
  } else {
    TORCH_CHECK_VALUE(false, "alphaquant: ALPHAQUANT_CPU_ISA must be portable, avx2 or avx512_vnni (or unset for "
                      "the best this CPU has); got '", name, "'");
  }
  return static_cast<int>(asked) < static_cast<int>(best) ? asked : best;
}

bool bf16_dot_usable(CpuIsa isa) {
  static const bool has = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
  }();
  return has && isa == CpuIsa::kAvx512Vnni;
}

std::string cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512Vnni: return "avx512_vnni";
    case CpuIsa::kAvx2: return "avx2";
    default: return "portable";
  }
}

}  // namespace alphaquant
