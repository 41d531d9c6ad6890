"""The Python face of the native ops (torch.ops.alphaquant.*): typed wrappers and fake kernels.

Every op is registered in csrc/ops.cpp; CPU kernels live in csrc/cpu/, CUDA kernels in
csrc/cuda/. The fake kernels below give exact output shapes so that torch.compile can trace
through the ops. Layouts:

* a packed row of k codes of b bits takes ceil(k*b/8) bytes (little-endian bit stream, see
  csrc/include/alphaquant/formats.h);
* ``group_size`` > 0 puts groups of that many values along the last dimension (the last group
  of a row may be shorter), 0 means one group per row (per-channel), -1 one scale per tensor;
* scales and zero points are float32 of shape ``x.shape[:-1] + (groups,)`` (all ones per tensor).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _native  # noqa: F401  (registers the ops)
from .formats import format_bits, is_float_format

_ops = torch.ops.alphaquant


def _groups(k, group_size: int):
    if group_size <= 0 or group_size >= k:
        return 1
    return (k + group_size - 1) // group_size


def scale_shape(shape, group_size: int) -> tuple:
    """Shape of the scale (and zero point) tensor for an input of ``shape``."""
    shape = tuple(shape)
    if group_size == -1:
        return (1,) * len(shape)
    return shape[:-1] + (_groups(shape[-1], group_size),)


def _is_asymmetric(fmt: str, symmetric: bool) -> bool:
    return not is_float_format(fmt) and not symmetric


# ---------------------------------------------------------------- wrappers

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into a dense bit stream per row.

    codes: uint8 [..., k], every value < 2**bits. Returns uint8 [..., ceil(k*bits/8)].
    """
    return _ops.pack(codes, bits)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [..., ceil(k*bits/8)] -> uint8 codes [..., k]."""
    return _ops.unpack(packed, bits, k)


def encode_float(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Encode float values (float32/16/bf16, any shape) as codes of a float format, one uint8 each.

    Rounds to nearest even. fp8_e4m3 saturates overflow and Inf to +-448 and keeps NaN; fp8_e5m2
    rounds overflow to Inf (both as torch's casts do); fp6/fp4 saturate overflow and reject NaN/Inf.
    """
    return _ops.encode_float(x, fmt)


def decode_float(codes: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode uint8 codes of a float format to ``dtype`` (float32/16/bf16), same shape."""
    return _ops.decode_float(codes, fmt, dtype)


def quantize(
    x: torch.Tensor,
    fmt: str,
    *,
    symmetric: bool = True,
    group_size: int = 128,
    scale: Optional[torch.Tensor] = None,
    zero_point: Optional[torch.Tensor] = None,
    stochastic: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` [..., k] (float32/16/bf16) to a packed format.

    Returns (packed uint8 [..., ceil(k*bits/8)], scale float32, zero_point float32). zero_point
    is empty (shape [0]) unless the format is an asymmetric integer. Scales are computed from
    each group's min/max unless ``scale`` (and for asymmetric ints ``zero_point``) are given.
    ``stochastic`` rounds up with probability equal to the discarded fraction, reproducibly for
    a given ``seed``. NaN/Inf raise ValueError except for fp8 formats, which encode them.
    """
    return _ops.quantize(x, fmt, symmetric, group_size, scale, zero_point, stochastic, seed)


def dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    fmt: str,
    *,
    symmetric: bool = True,
    group_size: int = 128,
    k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed uint8 [..., ceil(k*bits/8)] with its scales -> float [..., k] in ``dtype``."""
    return _ops.dequantize(packed, scale, zero_point, fmt, symmetric, group_size, k, dtype)


def fake_quantize(
    x: torch.Tensor,
    fmt: str,
    *,
    symmetric: bool = True,
    group_size: int = 128,
    scale: Optional[torch.Tensor] = None,
    zero_point: Optional[torch.Tensor] = None,
    stochastic: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """Quantize and dequantize ``x`` in one pass (no packed intermediate); same shape and dtype.

    Differentiable with a straight-through gradient (d out / d x = 1).
    """
    return _ops.fake_quantize(x, fmt, symmetric, group_size, scale, zero_point, stochastic, seed)


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    fmt: str,
    *,
    symmetric: bool = True,
    group_size: int = 128,
    k: int,
) -> torch.Tensor:
    """``x @ W.T + bias`` with W dequantized inside the kernel.

    x: [..., k] float32/16/bf16; packed: uint8 [n, ceil(k*bits/8)] (a weight quantized by
    :func:`quantize`); scale/zero_point: [n, groups] float32 ([1, 1] per tensor); bias: [n] or
    None. Returns [..., n] in x's dtype.
    """
    return _ops.linear(x, packed, scale, zero_point, bias, fmt, symmetric, group_size, k)


# ---------------------------------------------------------------- fake kernels

@torch.library.register_fake("alphaquant::pack")
def _pack_fake(codes, bits):
    k = codes.shape[-1]
    return codes.new_empty(tuple(codes.shape[:-1]) + ((k * bits + 7) // 8,))


@torch.library.register_fake("alphaquant::unpack")
def _unpack_fake(packed, bits, k):
    return packed.new_empty(tuple(packed.shape[:-1]) + (k,))


@torch.library.register_fake("alphaquant::encode_float")
def _encode_float_fake(x, fmt):
    return x.new_empty(x.shape, dtype=torch.uint8)


@torch.library.register_fake("alphaquant::decode_float")
def _decode_float_fake(codes, fmt, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


@torch.library.register_fake("alphaquant::quantize")
def _quantize_fake(x, fmt, symmetric, group_size, scale, zero_point, stochastic, seed):
    k = x.shape[-1]
    packed = x.new_empty(tuple(x.shape[:-1]) + ((k * format_bits(fmt) + 7) // 8,), dtype=torch.uint8)
    s_shape = scale_shape(x.shape, group_size)
    s = x.new_empty(s_shape, dtype=torch.float32)
    z = x.new_empty(s_shape if _is_asymmetric(fmt, symmetric) else (0,), dtype=torch.float32)
    return packed, s, z


@torch.library.register_fake("alphaquant::dequantize")
def _dequantize_fake(packed, scale, zero_point, fmt, symmetric, group_size, k, dtype):
    return packed.new_empty(tuple(packed.shape[:-1]) + (k,), dtype=dtype)


@torch.library.register_fake("alphaquant::fake_quantize")
def _fake_quantize_fake(x, fmt, symmetric, group_size, scale, zero_point, stochastic, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("alphaquant::linear")
def _linear_fake(x, packed, scale, zero_point, bias, fmt, symmetric, group_size, k):
    return x.new_empty(tuple(x.shape[:-1]) + (packed.shape[0],))


# ---------------------------------------------------------------- autograd

def _fake_quantize_backward(ctx, grad):
    # Straight-through estimator: rounding is treated as the identity.
    return grad, None, None, None, None, None, None, None


def _fake_quantize_setup(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "alphaquant::fake_quantize", _fake_quantize_backward, setup_context=_fake_quantize_setup
)


def _quantize_fake_shapes(rows: int, k: int, fmt: str, symmetric: bool, group_size: int):
    """(packed, scale, zero_point or None) shapes of a [rows, k] tensor quantized with these settings."""
    s = scale_shape((rows, k), group_size)
    return (rows, (k * format_bits(fmt) + 7) // 8), s, (s if _is_asymmetric(fmt, symmetric) else None)
