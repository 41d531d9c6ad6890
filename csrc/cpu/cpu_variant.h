// The CPU kernel files whose fast paths are AVX2/FMA/F16C code (linear_cpu.cpp, quantize_cpu.cpp,
// codebook_cpu.cpp, quantization_error_cpu.cpp and the headers only they include: dot.h,
// linear_avx2.h, int_block_values.h, store_block.h, quantize_avx2.h) are compiled twice, so that
// one build runs on any x86-64 CPU:
//   - as themselves, for the x86-64 baseline: namespace alphaquant::baseline, AQ_AVX2 0;
//   - through csrc/cpu/avx2/<file>.cpp, which includes the library headers first (they stay
//     baseline code), then turns on `#pragma GCC target("avx2,fma,f16c")` and includes the file:
//     namespace alphaquant::avx2, AQ_AVX2 1.
// cpu_dispatch.cpp registers the ops and calls the avx2 versions on CPUs that have AVX2, FMA and
// F16C (cpu_isa.h; ALPHAQUANT_CPU_ISA=portable picks the baseline ones). Each variant's functions
// live in its own namespace, so the two never share a symbol; the avx2 objects come last in the
// link, so inline library functions they also emit are taken from the baseline objects.
#pragma once

#ifndef AQ_CPU_VARIANT
#define AQ_CPU_VARIANT baseline
#define AQ_AVX2 0
#else
#define AQ_AVX2 1
#endif
