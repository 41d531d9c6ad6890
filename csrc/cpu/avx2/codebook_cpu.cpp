// codebook_cpu.cpp compiled for CPUs with AVX2, FMA and F16C (cpu_variant.h; called by cpu_dispatch.cpp).
#if defined(__x86_64__)
#include "cpu/avx2/variant_prelude.h"
#pragma GCC target("avx2,fma,f16c")
#define AQ_CPU_VARIANT avx2
#include "cpu/codebook_cpu.cpp"
#endif
