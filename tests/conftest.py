import pytest
import torch

import alphaquant  # noqa: F401
from alphaquant._native import has_cuda_kernels

CUDA_OK = torch.cuda.is_available() and has_cuda_kernels()
DEVICES = ["cpu"] + (["cuda"] if CUDA_OK else [])
cuda_only = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and an extension built with CUDA kernels")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
