"""Integer quantization functions under the module path the original documentation lists
(``alphaquant/quantizers/kernel/int_torch.py``). They are aliases of the native ops in
alphaquant.ops (torch.ops.alphaquant.*, C++ on CPU and CUDA) with integer-width arguments;
new code can call alphaquant.ops directly. The pure-PyTorch oracle is alphaquant.reference."""
from __future__ import annotations

from typing import Optional

import torch

from ... import ops
from ...formats import int_range  # noqa: F401  (re-exported: (qmin, qmax) of a width)


def int_quantize(x: torch.Tensor, bits: int, symmetric: bool = True, group_size: int = 128,
                 scale: Optional[torch.Tensor] = None, zero_point: Optional[torch.Tensor] = None,
                 stochastic: bool = False, seed: int = 0):
    """(packed uint8, scale, zero_point) of ``x`` as ``bits``-bit integers."""
    return ops.quantize(x, f"int{bits}", symmetric=symmetric, group_size=group_size, scale=scale,
                        zero_point=zero_point, stochastic=stochastic, seed=seed)


def int_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], bits: int, k: int,
                   symmetric: bool = True, group_size: int = 128, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float values [..., k] of packed ``bits``-bit integers."""
    return ops.dequantize(packed, scale, zero_point, f"int{bits}", symmetric=symmetric, group_size=group_size, k=k,
                          dtype=dtype)


def int_fake_quantize(x: torch.Tensor, bits: int, symmetric: bool = True, group_size: int = 128,
                      stochastic: bool = False, seed: int = 0) -> torch.Tensor:
    """Quantize and dequantize ``x`` in one pass, as ``bits``-bit integers."""
    return ops.fake_quantize(x, f"int{bits}", symmetric=symmetric, group_size=group_size, stochastic=stochastic,
                             seed=seed)
