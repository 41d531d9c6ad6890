import pytest
import torch

import alphaquant  # noqa: F401
from alphaquant._native import has_cuda_kernels

# CUDA tests need both a GPU and an extension built with its CUDA kernels.
CUDA_OK = torch.cuda.is_available() and has_cuda_kernels()
_CUDA_REASON = "needs a CUDA GPU and an extension built with CUDA kernels"

# Device parameters; the CUDA one carries the `cuda` marker, so `-m cuda` selects it.
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if CUDA_OK else [])


def cuda_only(test):
    """Marks a CUDA-only test: skipped with a reason unless CUDA_OK, selected by `-m cuda`."""
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA_OK, reason=_CUDA_REASON)(test))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
