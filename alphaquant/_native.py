"""Loads the native library, which registers every op under torch.ops.alphaquant."""
import importlib
from typing import Optional


def cpu_flags() -> Optional[set]:
    """This CPU's feature flags (Linux), None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def check_cpu_runs_build(built_for: str, flags: Optional[set]) -> None:
    """Raise ImportError if the library was compiled for AVX2/FMA throughout (builds before the
    kernels chose AVX2 at run time did so when the build machine had them; setup.py now records
    "baseline") and this CPU lacks them: loading it would die on an illegal instruction."""
    if built_for == "avx2" and flags is not None and not {"avx2", "fma", "f16c"} <= flags:
        raise ImportError("alphaquant's native library was built for CPUs with AVX2, FMA and F16C (the build "
                          "machine has them) and this CPU lacks "
                          f"{', '.join(sorted({'avx2', 'fma', 'f16c'} - flags))}; rebuild it here with "
                          "ALPHAQUANT_NO_AVX2=1 (pip install --no-build-isolation -e .)")


try:
    from ._build_isa import BUILT_FOR
except ImportError:  # built before setup.py recorded it
    BUILT_FOR = "unknown"
check_cpu_runs_build(BUILT_FOR, cpu_flags())

try:
    _C = importlib.import_module("alphaquant._C")
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "alphaquant's native extension is not built; install with `pip install --no-build-isolation -e .`"
    ) from e


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(_C.WITH_CUDA)
