"""Loads the native library, which registers every op under torch.ops.alphaquant."""
import importlib

try:
    _C = importlib.import_module("alphaquant._C")
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "alphaquant's native extension is not built; install with `pip install --no-build-isolation -e .`"
    ) from e


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(_C.WITH_CUDA)
