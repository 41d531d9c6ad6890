"""Build of AlphaQuant's native extension (alphaquant._C).

C++ CPU kernels are always built; CUDA kernels when torch has CUDA and a toolkit is found.
Switches (environment):
  ALPHAQUANT_CUDA=1|0      force or skip the CUDA kernels (default: auto)
  ALPHAQUANT_DEBUG_BUILD=1 compile with -O0 -g
  ALPHAQUANT_SANITIZE=1    C++ kernels with AddressSanitizer and UndefinedBehaviorSanitizer
                           (-fsanitize=address,undefined, compile and link); python must then run
                           with the sanitizer runtimes preloaded: see scripts/run_sanitized_tests.sh
  ALPHAQUANT_NO_AVX2=1     do not build the AVX2/FMA/F16C variants of the older CPU kernels (x86;
                           the int8-activation kernels are always built and chosen by CPUID)
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default 9.0 when no GPU is visible)
  MAX_JOBS                 parallel compile jobs (honoured by torch's ninja build)
"""
import glob
import os
import platform

from setuptools import find_packages, setup

if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # a wrapper nvcc on PATH would mislead torch

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def build_cuda() -> bool:
    switch = os.environ.get("ALPHAQUANT_CUDA", "auto")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if switch == "1" and not available:
        raise RuntimeError("ALPHAQUANT_CUDA=1 but torch has no CUDA or no CUDA toolkit was found (set CUDA_HOME)")
    return switch != "0" and available


def cpu_flags() -> list[str]:
    if os.environ.get("ALPHAQUANT_DEBUG_BUILD") == "1":
        return ["-O0", "-g", "-fopenmp"]
    # exact IEEE rounding (no contraction), vectorizable libm calls; -fopenmp because
    # at::parallel_for is inlined into our code and runs serially without it
    return ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]


def avx2_variants() -> bool:
    """Whether the AVX2/FMA/F16C variants of the CPU kernels are built (csrc/cpu/cpu_variant.h):
    on x86-64 unless ALPHAQUANT_NO_AVX2=1. The rest of the code targets the x86-64 baseline, and
    the variants run only on CPUs that have AVX2 (chosen at run time), so one build runs anywhere."""
    return platform.machine() == "x86_64" and os.environ.get("ALPHAQUANT_NO_AVX2") != "1"


def write_build_isa(flags: list[str]) -> None:
    """Record what the C++ code targets beyond the x86-64 baseline, for alphaquant/_native.py to
    check before the library loads (a CPU without AVX2 would otherwise die on an illegal instruction).
    Code for more than the baseline is only in kernels chosen at run time: "baseline"."""
    built_for = "avx2" if "-mavx2" in flags else "baseline"
    with open(os.path.join("alphaquant", "_build_isa.py"), "w") as f:
        f.write("# Written by setup.py: the instruction set the C++ kernels were compiled for (checked in _native.py).\n"
                f"BUILT_FOR = {built_for!r}\n")


def sanitizer_flags() -> list[str]:
    if os.environ.get("ALPHAQUANT_SANITIZE") != "1":
        return []
    return ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]


with_cuda = build_cuda()
sources = ["csrc/ops.cpp", "csrc/format_and_layout.cpp", "csrc/arg_checks.cpp", "csrc/embedding.cpp",
           "csrc/quantization_error.cpp", "csrc/mx_nan_blocks.cpp", "csrc/linear_autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
include_dirs = [os.path.abspath("csrc/include"), os.path.abspath("csrc")]
extra = {"cxx": cpu_flags() + sanitizer_flags() + ["-DPy_LIMITED_API=0x030A0000"]}
if avx2_variants():
    extra["cxx"] += ["-DALPHAQUANT_AVX2_VARIANTS"]
write_build_isa(extra["cxx"])
Extension = CppExtension
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0" if not torch.cuda.is_available() else "")
    if not os.environ["TORCH_CUDA_ARCH_LIST"]:
        del os.environ["TORCH_CUDA_ARCH_LIST"]  # let torch detect the visible GPUs
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    debug = os.environ.get("ALPHAQUANT_DEBUG_BUILD") == "1"
    extra["nvcc"] = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    extra["nvcc"] += ["-DALPHAQUANT_WITH_CUDA"]
    extra["cxx"] += ["-DALPHAQUANT_WITH_CUDA"]
    Extension = CUDAExtension
else:
    sources += ["csrc/cuda_missing.cpp"]
if avx2_variants():  # last in the link: inline functions they share with the rest come from baseline code
    sources += sorted(glob.glob("csrc/cpu/avx2/*.cpp"))

setup(
    packages=find_packages(include=["alphaquant", "alphaquant.*"]),
    ext_modules=[
        Extension(
            "alphaquant._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"] + sanitizer_flags(),
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
