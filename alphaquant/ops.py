"""The Python face of the native ops (torch.ops.alphaquant.*): typed wrappers and fake kernels.

Every op is registered in csrc/ops.cpp; CPU kernels live in csrc/cpu/, CUDA kernels in
csrc/cuda/. The fake kernels below give exact output shapes so that torch.compile can trace
through the ops. Layouts:

* a packed row of k codes of b bits takes ceil(k*b/8) bytes (little-endian bit stream, see
  csrc/include/alphaquant/formats.h);
* ``group_size`` > 0 puts groups of that many values along the last dimension (the last group
  of a row may be shorter), 0 means one group per row (per-channel), -1 one scale per tensor;
* scales and zero points are float32 of shape ``x.shape[:-1] + (groups,)`` (all ones per tensor);
* every tensor argument of an op must be on one device; the ops that read scales (dequantize,
  linear, quantize with given scales) require them finite and > 0 and zero points finite.

The fake kernels check their arguments as the native kernels do (device, format, dtypes, shapes),
so the meta device and torch.compile reject what the kernels would reject, with the same words.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _native  # noqa: F401  (registers the ops)
from .formats import (CODEBOOK_FORMATS, FLOAT_FORMATS, INT8_ACT_BLOCK, INT8_ACT_FORMATS, LEARNED_CODEBOOK_SIZE,
                      LEARNED_FORMATS, MX_BLOCK, MX_FORMATS, NVFP4, NVFP4_BLOCK, format_bits, packed_row_bytes)
from .layout import check_op_group_size, scale_shape  # scale_shape also re-exported: ops.scale_shape

_ops = torch.ops.alphaquant


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
    """Encode float values (float32/16/bf16, any shape) as codes of a float or code book format, one uint8 each.

    Rounds to nearest even. fp8_e4m3 saturates overflow and Inf to +-448 and keeps NaN; fp8_e5m2
    rounds overflow to Inf (both as torch's casts do); fp6/fp4 saturate overflow and reject NaN/Inf.
    nf4 takes the nearest table value (a value on a midpoint takes the lower code), saturates
    beyond +-1 and rejects NaN/Inf.
    """
    return _ops.encode_float(x, fmt)


def decode_float(codes: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode uint8 codes of a float or code book format to ``dtype`` (float32/16/bf16), same shape."""
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
    Block-scaled formats return scale bytes: E8M0 for MX (group_size 32), E4M3 for nvfp4
    (group_size 16), whose float32 global scale [1] comes back as zero_point and may be given
    as zero_point (with or without the scale bytes) to quantize under a chosen global scale.
    ``stochastic`` rounds up with probability equal to the discarded fraction, reproducibly for
    a given ``seed``. NaN/Inf raise ValueError except for fp8 formats, which encode them, and MX
    formats, which give their blocks the NaN scale (byte 255: the block decodes to NaN).
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
    validate: bool = True,
) -> torch.Tensor:
    """Packed uint8 [..., ceil(k*bits/8)] with its scales -> float [..., k] in ``dtype``.

    ``validate`` checks every scale (finite, > 0) and zero point (finite) and raises ValueError
    on a bad one; pass False only for scales already checked (on CUDA the check costs a sync).
    """
    return _ops.dequantize(packed, scale, zero_point, fmt, symmetric, group_size, k, dtype, validate)


def quantization_error(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    fmt: str,
    *,
    symmetric: bool = True,
    group_size: int = 128,
) -> torch.Tensor:
    """float64 [2] on the CPU: (sum of x^2, sum of (x - dequantize(packed))^2), the error of a
    quantized ``x`` [..., k] in one pass over x and its packed codes, without decoding a copy
    (SQNR = 10 log10(first / second)). The difference is taken in float32, as dequantize gives it;
    its squares are summed in float32 runs of at most 512 terms, then in double (relative error
    ~1e-6)."""
    return _ops.quantization_error(x, packed, scale, zero_point, fmt, symmetric, group_size)


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
    validate: bool = True,
) -> torch.Tensor:
    """``x @ W.T + bias`` with W dequantized inside the kernel.

    x: [..., k] float32/16/bf16; packed: uint8 [n, ceil(k*bits/8)] (a weight quantized by
    :func:`quantize`); scale/zero_point: [n, groups] float32 ([1, 1] per tensor); bias: [n]
    floating or None. Returns [..., n] in x's dtype. ``validate`` as in :func:`dequantize`.

    Differentiable in x and bias (d x = grad @ W, d bias = grad summed over leading dims);
    the packed weight and its scales get no gradient.
    """
    return _ops.linear(x, packed, scale, zero_point, bias, fmt, symmetric, group_size, k, validate)



def int8_act_layout(packed: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], fmt: str, *,
                    symmetric: bool = True, group_size: int = 128, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU layout of a weight for :func:`linear_int8_act`: (codes, params).

    packed/scale/zero_point as for :func:`linear`, of a format in
    ``alphaquant.formats.INT8_ACT_FORMATS`` (int1..int8 symmetric or not, mxint8, fp4/fp6 E2M1/E2M3
    with or without MX scales, nvfp4: values on an integer grid); group_size a multiple of 32, 16
    (two groups per activation block, as nvfp4's), 0 or -1.
    codes: uint8 [ceil(n/16), ceil(k/32), 16*32*sbits/8] (sbits 2, 4 or 8 bits per code), params:
    float32 [ceil(n/16), groups, 2, 16] (per row and group: the factor of the code's grid value and
    the offset). CPU only; the plain packed weight stays the stored form (csrc/cpu/int8_act_layout.h).
    """
    return _ops.int8_act_layout(packed, scale, zero_point, fmt, symmetric, group_size, k)


def int8_act_unlayout(codes: torch.Tensor, fmt: str, *, n: int, k: int) -> torch.Tensor:
    """The packed weight uint8 [n, ceil(k*bits/8)] whose :func:`int8_act_layout` codes are ``codes``
    (the inverse of the layout's codes, so that a layer need not keep both). Exact for every code
    but E2M3's -0 (fp6_e2m3, mxfp6_e2m3), whose grid value is +0's: it comes back as +0. CPU only."""
    return _ops.int8_act_unlayout(codes, fmt, n, k)


def linear_int8_act(x: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, bias: Optional[torch.Tensor], *,
                    fmt: str, group_size: int, n: int, k: int) -> torch.Tensor:
    """``x @ W.T + bias`` with x quantized to int8 per block of 32 values and integer dot products
    (llama.cpp's CPU scheme): W [n, k] of format ``fmt`` from :func:`int8_act_layout`. x: [..., k]
    float32/16/bf16 without NaN/Inf; returns [..., n] in x's dtype. CPU only; no gradient. The
    instruction set is chosen at run time (:func:`cpu_isa`)."""
    return _ops.linear_int8_act(x, codes, params, bias, fmt, group_size, n, k)


def cpu_isa() -> str:
    """The instruction set of the CPU kernels that dispatch at run time: "avx512_vnni", "avx2" or
    "portable" (the best this CPU has, or lower by the environment variable ALPHAQUANT_CPU_ISA)."""
    return _native._C.cpu_isa()  # a module function of the extension: it takes no tensors, so it is no op


def cpu_bf16_dot() -> bool:
    """Whether the CPU `linear` op multiplies bf16 activations (up to 16 rows) with AVX-512 BF16
    dot products (`vdpbf16ps`) on this CPU: it has AVX-512 BF16 and VBMI and `cpu_isa()` is
    "avx512_vnni". Elsewhere bf16 activations go through float32."""
    return _native._C.cpu_bf16_dot()


def dequantize_codebook(
    packed: torch.Tensor,
    scale: torch.Tensor,
    codebook: torch.Tensor,
    *,
    group_size: int = 64,
    k: int,
    dtype: torch.dtype = torch.float32,
    validate: bool = True,
) -> torch.Tensor:
    """4-bit codes of a learned code book (lut4) -> float [..., k]: ``codebook[row or 0][code] * scale``.

    packed: uint8 [..., ceil(k/2)] (two codes a byte, low nibble first); scale: float [..., groups]
    (all ones per tensor) as for :func:`dequantize`; codebook: floating [16] (one for the tensor)
    or [..., 16] (one per row, ``packed.shape[:-1] + (16,)``). ``validate`` checks every scale
    (finite, > 0) and every code book value (finite).
    """
    return _ops.dequantize_codebook(packed, scale, codebook, group_size, k, dtype, validate)


def linear_codebook(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    codebook: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    group_size: int = 64,
    k: int,
    validate: bool = True,
) -> torch.Tensor:
    """``x @ W.T + bias`` with W the learned-code-book weight, dequantized inside the kernel.

    x: [..., k] float32/16/bf16; packed: uint8 [n, ceil(k/2)]; scale: [n, groups] ([1, 1] per
    tensor); codebook: [16] or [n, 16]; bias: [n] floating or None. Returns [..., n] in x's
    dtype. Differentiable in x and bias, as :func:`linear`.
    """
    return _ops.linear_codebook(x, packed, scale, codebook, bias, group_size, k, validate)


def embedding(
    indices: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    fmt: str,
    *,
    symmetric: bool = True,
    group_size: int = 128,
    k: int,
    dtype: torch.dtype = torch.float32,
    validate: bool = True,
) -> torch.Tensor:
    """Rows ``indices`` of a packed table, dequantized: ``dequantize(table)[indices]`` without
    decoding the other rows.

    indices: int64/int32 of any shape, each in [0, rows) (IndexError otherwise); packed: uint8
    [rows, ceil(k*bits/8)] with scale/zero_point as for :func:`dequantize`. Returns
    ``indices.shape + (k,)`` in ``dtype``. No gradient (the table is integer codes).
    """
    return _ops.embedding(indices, packed, scale, zero_point, fmt, symmetric, group_size, k, dtype, validate)


def embedding_codebook(
    indices: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    codebook: torch.Tensor,
    *,
    group_size: int = 64,
    k: int,
    dtype: torch.dtype = torch.float32,
    validate: bool = True,
) -> torch.Tensor:
    """:func:`embedding` for a learned code book table (lut4): codebook [16] or [rows, 16]."""
    return _ops.embedding_codebook(indices, packed, scale, codebook, group_size, k, dtype, validate)


# ---------------------------------------------------------------- argument checks of the fake kernels
# The same rules and messages as csrc/arg_checks.cpp and csrc/format_and_layout.cpp.

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FORMAT_NAMES = ("int1..int8, fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, nf4, "
                 "mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4_e2m1, mxint8, nvfp4")
_MAX_ROW_LENGTH = (2**63 - 1) // 8  # a row's length in bits still fits in int64
_INT64_MAX = 2**63 - 1


def _value_error(op: str, msg: str) -> ValueError:
    return ValueError(f"alphaquant.{op}: {msg}")


def _type_error(op: str, msg: str) -> TypeError:
    return TypeError(f"alphaquant.{op}: {msg}")


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _parse_format(fmt: str, symmetric: bool) -> tuple[int, bool]:
    """(bits, asymmetric int) of a format name, or the native kernels' error."""
    if len(fmt) == 4 and fmt.startswith("int") and "1" <= fmt[3] <= "8":
        if fmt == "int1" and symmetric:
            raise ValueError("alphaquant: int1 has no symmetric form (its symmetric range [-1, 0] has qmax = 0, so "
                             "max|x| / qmax is undefined); use symmetric=False")
        return int(fmt[3]), not symmetric
    if fmt in MX_FORMATS:
        if not symmetric:
            raise ValueError(f"alphaquant: MX format {fmt} is symmetric by definition (one shared power-of-two scale "
                             f"per block, no zero point); use symmetric=True")
        return format_bits(fmt), False
    if fmt == NVFP4:
        if not symmetric:
            raise ValueError("alphaquant: nvfp4 is symmetric by definition (E4M3 block scales and a global scale, no "
                             "zero point); use symmetric=True")
        return 4, False
    if fmt not in FLOAT_FORMATS + CODEBOOK_FORMATS:
        raise ValueError(f"alphaquant: unknown format '{fmt}'; allowed: {_FORMAT_NAMES}")
    if not symmetric:
        kind = "code book" if fmt in CODEBOOK_FORMATS else "float"
        raise ValueError(f"alphaquant: {kind} format {fmt} is symmetric by definition; asymmetric (symmetric=False) "
                         f"is only for int formats")
    return format_bits(fmt), False


def _check_bits(op: str, bits: int) -> None:
    if not 1 <= bits <= 8:
        raise _value_error(op, f"bits must be in 1..8; got {bits}")


def _check_floating(op: str, x: torch.Tensor) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise _type_error(op, f"input must be float32, float16 or bfloat16; got {x.dtype}")


def _check_output_dtype(op: str, dtype: torch.dtype) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise _type_error(op, f"output dtype must be float32, float16 or bfloat16; got {dtype}")


def _check_same_device(op: str, ref: torch.Tensor, ref_name: str, t: Optional[torch.Tensor], name: str) -> None:
    if t is not None and t.device != ref.device:
        raise _value_error(op, f"{name} is on {t.device} but {ref_name} is on {ref.device}; every tensor argument "
                               f"must be on the same device")


def _check_layout(shape, group_size: int) -> None:
    if len(shape) == 0:
        raise ValueError("alphaquant: expected a tensor with at least one dimension, got a scalar")
    check_op_group_size(group_size)


def _check_row_length(op: str, k: int, rows: int) -> None:
    if k <= 0:
        raise _value_error(op, f"k (values per row) must be > 0; got {k}")
    most = min(_MAX_ROW_LENGTH, _INT64_MAX // rows) if rows > 1 else _MAX_ROW_LENGTH
    if k > most:
        raise _value_error(op, f"k={k} is too large for {rows} row(s): sizes derived from it would overflow int64; "
                               f"at most {most}")


def _check_packed_rows(op: str, packed: torch.Tensor, bits: int, k: int, what: str) -> None:
    if packed.dtype != torch.uint8:
        raise _type_error(op, f"packed must be uint8; got {packed.dtype}")
    if packed.dim() < 1 or packed.numel() == 0:
        raise _value_error(op, f"packed must be a non-empty tensor with at least one dimension; got shape "
                               f"{_shape(packed)}")
    _check_row_length(op, k, packed.numel() // packed.shape[-1])
    row_bytes = packed_row_bytes(k, bits)
    if packed.shape[-1] != row_bytes:
        raise _value_error(op, f"packed rows hold {packed.shape[-1]} bytes, but {k} {what} of {bits} bits take "
                               f"{row_bytes}")


def _check_block_group(op: str, fmt: str, group_size: int) -> None:
    block = MX_BLOCK if fmt in MX_FORMATS else NVFP4_BLOCK if fmt == NVFP4 else None
    if block is not None and group_size != block:
        raise _value_error(op, f"{fmt} shares one scale per block of {block} values: group_size must be "
                               f"{block}; got {group_size}")


def _check_global_scale(op: str, ref: torch.Tensor, ref_name: str, g: Optional[torch.Tensor]) -> None:
    """nvfp4's global scale, which travels as zero_point: floating, shape [1], on ref's device."""
    if g is None:
        raise _value_error(op, "nvfp4 needs its float32 global scale (shape [1]) as zero_point, as quantize returns "
                               "it (nvfp4 has no zero point)")
    _check_same_device(op, ref, ref_name, g, "zero_point (nvfp4's global scale)")
    if g.dim() != 1 or g.numel() != 1:
        raise _value_error(op, f"nvfp4's global scale (zero_point) must have shape [1]; got {_shape(g)}")
    if not g.dtype.is_floating_point:
        raise _type_error(op, f"nvfp4's global scale (zero_point) must be a floating tensor; got {g.dtype}")


def _check_params(op: str, ref: torch.Tensor, ref_name: str, t: torch.Tensor, name: str, expected: tuple,
                  shape, group_size: int, fmt: str = "") -> None:
    """A scale or zero point argument: on ref's device, of the expected shape, floating (zero points
    may also be uint8 one-byte codes; MX scales are uint8 E8M0 bytes)."""
    _check_same_device(op, ref, ref_name, t, name)
    if tuple(t.shape) != tuple(expected):
        raise _value_error(op, f"{name} has shape {_shape(t)}; expected {list(expected)} for input shape "
                               f"{list(shape)} with group_size={group_size}")
    if fmt in MX_FORMATS and name == "scale":
        if t.dtype != torch.uint8:
            raise _type_error(op, f"{fmt} scales are E8M0 bytes (uint8: X = 2^(e - 127)); got {t.dtype}")
        return
    if fmt == NVFP4 and name == "scale":
        if t.dtype not in (torch.uint8, torch.float8_e4m3fn):
            raise _type_error(op, f"nvfp4 scales are E4M3 bytes (uint8 or float8_e4m3fn); got {t.dtype}")
        return
    if name == "zero_point" and t.dtype == torch.uint8:
        return  # one-byte zero points (alphaquant.formats.zero_grid)
    if not t.dtype.is_floating_point:
        allowed = " or uint8 (one-byte zero points)" if name == "zero_point" else ""
        raise _type_error(op, f"{name} must be a floating tensor{allowed}; got {t.dtype}")


def _check_quantize(op: str, x, fmt, symmetric, group_size, scale, zero_point) -> tuple[int, bool]:
    """The checks of quantize and fake_quantize; returns (bits, asymmetric int)."""
    _check_floating(op, x)
    bits, asym = _parse_format(fmt, symmetric)
    _check_block_group(op, fmt, group_size)
    _check_layout(x.shape, group_size)
    if x.numel() == 0:
        raise _value_error(op, f"input is empty (shape {_shape(x)}); quantization needs at least one element")
    expected = scale_shape(x.shape, group_size)
    if fmt == NVFP4:  # zero_point is the global scale: given or computed, with or without scale
        if zero_point is not None:
            _check_global_scale(op, x, "x", zero_point)
        if scale is not None:
            _check_params(op, x, "x", scale, "scale", expected, x.shape, group_size, fmt)
        return bits, asym
    if scale is not None:
        _check_params(op, x, "x", scale, "scale", expected, x.shape, group_size, fmt)
        if asym:
            if zero_point is None:
                raise _value_error(op, "asymmetric formats need zero_point together with a given scale")
            _check_params(op, x, "x", zero_point, "zero_point", expected, x.shape, group_size)
    elif zero_point is not None:
        raise _value_error(op, "zero_point was given without scale; pass both (static) or neither (dynamic)")
    if not asym and zero_point is not None:
        raise _value_error(op, f"zero_point is only used by asymmetric int formats; {fmt} (symmetric={bool(symmetric)}) "
                               f"takes none")
    return bits, asym


def _check_dequantize(op: str, packed, scale, zero_point, fmt, symmetric, group_size, k) -> None:
    bits, asym = _parse_format(fmt, symmetric)
    _check_block_group(op, fmt, group_size)
    _check_packed_rows(op, packed, bits, k, "values")
    out_shape = tuple(packed.shape[:-1]) + (k,)
    _check_layout(out_shape, group_size)
    expected = scale_shape(out_shape, group_size)
    if fmt == NVFP4:
        _check_global_scale(op, packed, "packed", zero_point)
        _check_params(op, packed, "packed", scale, "scale", expected, out_shape, group_size, fmt)
        return
    _check_params(op, packed, "packed", scale, "scale", expected, out_shape, group_size, fmt)
    if asym:
        if zero_point is None:
            raise _value_error(op, f"asymmetric {fmt} needs zero_point")
        _check_params(op, packed, "packed", zero_point, "zero_point", expected, out_shape, group_size)
    else:
        _check_same_device(op, packed, "packed", zero_point, "zero_point")
        if zero_point is not None and zero_point.numel() != 0:
            raise _value_error(op, f"zero_point is only used by asymmetric int formats; {fmt} takes none")


def _check_linear_input(op: str, x, packed, bias, k) -> None:
    """What every linear op asks of x, the packed weight's rank and the devices."""
    _check_floating(op, x)
    _check_same_device(op, x, "x", packed, "packed")
    _check_same_device(op, x, "x", bias, "bias")
    if x.dim() < 1 or x.shape[-1] != k:
        raise _value_error(op, f"x must have last dimension k={k}; got shape {_shape(x)}")
    if packed.dim() != 2:
        raise _value_error(op, f"the packed weight must be 2-D [n, bytes per row]; got shape {_shape(packed)}")


def _check_linear(x, packed, scale, zero_point, bias, fmt, symmetric, group_size, k) -> None:
    op = "linear"
    _check_linear_input(op, x, packed, bias, k)
    _check_dequantize(op, packed, scale, zero_point, fmt, symmetric, group_size, k)
    if x.numel() == 0:
        raise _value_error(op, f"x is empty (shape {_shape(x)})")
    if bias is not None:
        n = packed.shape[0]
        if bias.dim() != 1 or bias.shape[0] != n:
            raise _value_error(op, f"bias must have shape [{n}]; got {_shape(bias)}")
        if not bias.dtype.is_floating_point:
            raise _type_error(op, f"bias must be a floating tensor; got {bias.dtype}")


def _check_codebook(op: str, packed, scale, codebook, group_size, k) -> None:
    """The checks of dequantize_codebook (csrc/arg_checks.cpp: prepare_dequantize_codebook)."""
    _check_packed_rows(op, packed, 4, k, "values")
    out_shape = tuple(packed.shape[:-1]) + (k,)
    _check_layout(out_shape, group_size)
    _check_params(op, packed, "packed", scale, "scale", scale_shape(out_shape, group_size), out_shape, group_size)
    _check_same_device(op, packed, "packed", codebook, "codebook")
    per_row = out_shape[:-1] + (LEARNED_CODEBOOK_SIZE,)
    if tuple(codebook.shape) not in (per_row, (LEARNED_CODEBOOK_SIZE,)):
        raise _value_error(op, f"codebook has shape {_shape(codebook)}; expected [{LEARNED_CODEBOOK_SIZE}] (one for "
                               f"the tensor) or {list(per_row)} (one per row) for values of shape {list(out_shape)}")
    if not codebook.dtype.is_floating_point:
        raise _type_error(op, f"codebook must be a floating tensor; got {codebook.dtype}")


def _check_float_format(op: str, fmt: str) -> int:
    bits, _ = _parse_format(fmt, True)
    if fmt not in FLOAT_FORMATS + CODEBOOK_FORMATS:
        raise _value_error(op, f"{fmt} is not a float format (nor a code book format); allowed: "
                               f"{', '.join(FLOAT_FORMATS + CODEBOOK_FORMATS)}")
    return bits


# ---------------------------------------------------------------- fake kernels

@torch.library.register_fake("alphaquant::pack")
def _pack_fake(codes, bits):
    _check_bits("pack", bits)
    if codes.dtype != torch.uint8:
        raise _type_error("pack", f"codes must be uint8; got {codes.dtype}")
    if codes.dim() < 1 or codes.numel() == 0:
        raise _value_error("pack", f"codes must be a non-empty tensor with at least one dimension; got shape "
                                   f"{_shape(codes)}")
    return codes.new_empty(tuple(codes.shape[:-1]) + (packed_row_bytes(codes.shape[-1], bits),))


@torch.library.register_fake("alphaquant::unpack")
def _unpack_fake(packed, bits, k):
    _check_bits("unpack", bits)
    _check_packed_rows("unpack", packed, bits, k, "codes")
    return packed.new_empty(tuple(packed.shape[:-1]) + (k,))


@torch.library.register_fake("alphaquant::encode_float")
def _encode_float_fake(x, fmt):
    _check_float_format("encode_float", fmt)
    _check_floating("encode_float", x)
    return x.new_empty(x.shape, dtype=torch.uint8)


@torch.library.register_fake("alphaquant::decode_float")
def _decode_float_fake(codes, fmt, dtype):
    _check_float_format("decode_float", fmt)
    if codes.dtype != torch.uint8:
        raise _type_error("decode_float", f"codes must be uint8; got {codes.dtype}")
    _check_output_dtype("decode_float", dtype)
    return codes.new_empty(codes.shape, dtype=dtype)


@torch.library.register_fake("alphaquant::quantize")
def _quantize_fake(x, fmt, symmetric, group_size, scale, zero_point, stochastic, seed):
    bits, asym = _check_quantize("quantize", x, fmt, symmetric, group_size, scale, zero_point)
    packed = x.new_empty(tuple(x.shape[:-1]) + (packed_row_bytes(x.shape[-1], bits),), dtype=torch.uint8)
    s_shape = scale_shape(x.shape, group_size)
    s = x.new_empty(s_shape, dtype=torch.uint8 if fmt in MX_FORMATS + (NVFP4,) else torch.float32)
    z = x.new_empty(s_shape if asym else (1,) if fmt == NVFP4 else (0,), dtype=torch.float32)
    return packed, s, z


@torch.library.register_fake("alphaquant::dequantize")
def _dequantize_fake(packed, scale, zero_point, fmt, symmetric, group_size, k, dtype, validate=True):
    _check_output_dtype("dequantize", dtype)
    _check_dequantize("dequantize", packed, scale, zero_point, fmt, symmetric, group_size, k)
    return packed.new_empty(tuple(packed.shape[:-1]) + (k,), dtype=dtype)


@torch.library.register_fake("alphaquant::quantization_error")
def _quantization_error_fake(x, packed, scale, zero_point, fmt, symmetric, group_size):
    op = "quantization_error"
    _check_floating(op, x)
    _check_same_device(op, x, "x", packed, "packed")
    if x.dim() < 1 or x.numel() == 0:
        raise _value_error(op, f"x must be a non-empty tensor with at least one dimension; got shape {_shape(x)}")
    if packed.dim() != x.dim() or tuple(packed.shape[:-1]) != tuple(x.shape[:-1]):
        raise _value_error(op, f"packed has shape {_shape(packed)}, which does not hold the rows of x of shape "
                               f"{_shape(x)} (the same leading dimensions, then the packed bytes of a row)")
    _check_dequantize(op, packed, scale, zero_point, fmt, symmetric, group_size, x.shape[-1])
    return torch.empty(2, dtype=torch.float64, device="cpu")


@torch.library.register_fake("alphaquant::fake_quantize")
def _fake_quantize_fake(x, fmt, symmetric, group_size, scale, zero_point, stochastic, seed):
    _check_quantize("fake_quantize", x, fmt, symmetric, group_size, scale, zero_point)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("alphaquant::linear")
def _linear_fake(x, packed, scale, zero_point, bias, fmt, symmetric, group_size, k, validate=True):
    _check_linear(x, packed, scale, zero_point, bias, fmt, symmetric, group_size, k)
    return x.new_empty(tuple(x.shape[:-1]) + (packed.shape[0],))



_INT8_ACT_TILE = 16


def _int8_act_shapes(op: str, fmt: str, group_size: int, n: int, k: int, pcount: int = 1):
    """(codes, params) shapes of int8_act_layout for a weight [n, k] of format ``fmt`` (params: one
    [16] per group, two with zero points)."""
    if fmt not in INT8_ACT_FORMATS:
        raise _value_error(op, f"the int8-activation path takes weights whose values are an integer grid "
                           f"({', '.join(INT8_ACT_FORMATS)}); got {fmt}")
    if group_size > 0 and group_size < k and group_size % INT8_ACT_BLOCK and group_size != INT8_ACT_BLOCK // 2:
        raise _value_error(op, f"group_size must be a multiple of {INT8_ACT_BLOCK}, {INT8_ACT_BLOCK // 2}, or 0 / -1; "
                           f"got {group_size}")
    bits = format_bits(fmt)
    sbits = 2 if bits <= 2 else 4 if bits <= 4 else 8
    tiles, kblocks = -(-n // _INT8_ACT_TILE), -(-k // INT8_ACT_BLOCK)
    groups = -(-k // group_size) if 0 < group_size < k else 1
    return (tiles, kblocks, _INT8_ACT_TILE * INT8_ACT_BLOCK * sbits // 8), (tiles, groups, pcount, _INT8_ACT_TILE)


@torch.library.register_fake("alphaquant::int8_act_layout")
def _int8_act_layout_fake(packed, scale, zero_point, fmt, symmetric, group_size, k):
    _check_dequantize("int8_act_layout", packed, scale, zero_point, fmt, symmetric, group_size, k)
    if packed.dim() != 2:
        raise _value_error("int8_act_layout", f"packed must be a weight [n, row bytes]; got {packed.dim()} dimensions")
    zero_points = fmt in INT8_ACT_FORMATS and fmt.startswith("int") and not symmetric
    codes, params = _int8_act_shapes("int8_act_layout", fmt, group_size, packed.shape[0], k, 2 if zero_points else 1)
    dtype = torch.float16 if scale.dtype == torch.float16 and not zero_points else torch.float32
    return packed.new_empty(codes), packed.new_empty(params, dtype=dtype)


@torch.library.register_fake("alphaquant::int8_act_unlayout")
def _int8_act_unlayout_fake(codes, fmt, n, k):
    op = "int8_act_unlayout"
    if n <= 0 or k <= 0:
        raise _value_error(op, f"n and k must be > 0; got n={n}, k={k}")
    want, _ = _int8_act_shapes(op, fmt, 0, n, k)
    if codes.dtype != torch.uint8 or tuple(codes.shape) != want:
        raise _value_error(op, f"codes must be uint8 {list(want)} (int8_act_layout of a {fmt} weight [{n}, {k}]); "
                           f"got {codes.dtype} {_shape(codes)}")
    return codes.new_empty((n, -(-k * format_bits(fmt) // 8)))


@torch.library.register_fake("alphaquant::linear_int8_act")
def _linear_int8_act_fake(x, codes, params, bias, fmt, group_size, n, k):
    op = "linear_int8_act"
    _check_floating(op, x)
    if n <= 0 or k <= 0 or x.dim() < 1 or x.shape[-1] != k:
        raise _value_error(op, f"needs n and k > 0 and x [..., k={k}]; got n={n}, x {_shape(x)}")
    pcount = params.shape[2] if params.dim() == 4 and params.shape[2] in (1, 2) else 1
    want_codes, want_params = _int8_act_shapes(op, fmt, group_size, n, k, pcount)
    if codes.dtype != torch.uint8 or tuple(codes.shape) != want_codes:
        raise _value_error(op, f"codes must be uint8 {list(want_codes)}; got {codes.dtype} {_shape(codes)}")
    if (params.dtype not in (torch.float32, torch.float16) or tuple(params.shape) != want_params
            or (pcount == 2 and (params.dtype != torch.float32 or not fmt.startswith("int")))):
        raise _value_error(op, f"params must be float32 or float16 {list(want_params)} (from int8_act_layout; 2 and "
                           f"float32 only for integers with zero points); got {params.dtype} {_shape(params)}")
    _check_same_device(op, x, "x", codes, "codes")
    _check_same_device(op, x, "x", params, "params")
    _check_same_device(op, x, "x", bias, "bias")
    return x.new_empty(tuple(x.shape[:-1]) + (n,))

@torch.library.register_fake("alphaquant::dequantize_codebook")
def _dequantize_codebook_fake(packed, scale, codebook, group_size, k, dtype, validate=True):
    _check_output_dtype("dequantize_codebook", dtype)
    _check_codebook("dequantize_codebook", packed, scale, codebook, group_size, k)
    return packed.new_empty(tuple(packed.shape[:-1]) + (k,), dtype=dtype)


@torch.library.register_fake("alphaquant::linear_codebook")
def _linear_codebook_fake(x, packed, scale, codebook, bias, group_size, k, validate=True):
    op = "linear_codebook"
    _check_linear_input(op, x, packed, bias, k)
    _check_codebook(op, packed, scale, codebook, group_size, k)
    if x.numel() == 0:
        raise _value_error(op, f"x is empty (shape {_shape(x)})")
    if bias is not None:
        n = packed.shape[0]
        if bias.dim() != 1 or bias.shape[0] != n:
            raise _value_error(op, f"bias must have shape [{n}]; got {_shape(bias)}")
        if not bias.dtype.is_floating_point:
            raise _type_error(op, f"bias must be a floating tensor; got {bias.dtype}")
    return x.new_empty(tuple(x.shape[:-1]) + (packed.shape[0],))


def _check_indices(op: str, indices, packed) -> None:
    if indices.dtype not in (torch.int64, torch.int32):
        raise _type_error(op, f"indices must be int64 or int32; got {indices.dtype}")
    _check_same_device(op, packed, "packed", indices, "indices")
    if packed.dim() != 2:
        raise _value_error(op, f"the packed table must be 2-D [rows, bytes per row]; got shape {_shape(packed)}")


@torch.library.register_fake("alphaquant::embedding")
def _embedding_fake(indices, packed, scale, zero_point, fmt, symmetric, group_size, k, dtype, validate=True):
    _check_output_dtype("embedding", dtype)
    _check_indices("embedding", indices, packed)
    _check_dequantize("embedding", packed, scale, zero_point, fmt, symmetric, group_size, k)
    return packed.new_empty(tuple(indices.shape) + (k,), dtype=dtype)


@torch.library.register_fake("alphaquant::embedding_codebook")
def _embedding_codebook_fake(indices, packed, scale, codebook, group_size, k, dtype, validate=True):
    _check_output_dtype("embedding_codebook", dtype)
    _check_indices("embedding_codebook", indices, packed)
    _check_codebook("embedding_codebook", packed, scale, codebook, group_size, k)
    return packed.new_empty(tuple(indices.shape) + (k,), dtype=dtype)


# ---------------------------------------------------------------- autograd

def _fake_quantize_backward(ctx, grad):
    # Straight-through estimator: rounding is treated as the identity.
    return grad, None, None, None, None, None, None, None


def _fake_quantize_setup(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "alphaquant::fake_quantize", _fake_quantize_backward, setup_context=_fake_quantize_setup
)


# linear and linear_codebook: csrc/linear_autograd.cpp (in C++, so that calls without gradients
# skip Python entirely).


def _quantize_fake_shapes(rows: int, k: int, fmt: str, symmetric: bool, group_size: int):
    """(packed, scale, zero_point or None) shapes of a [rows, k] tensor quantized with these settings."""
    if fmt in LEARNED_FORMATS:
        return (rows, packed_row_bytes(k, format_bits(fmt))), scale_shape((rows, k), group_size), None
    bits, asym = _parse_format(fmt, symmetric)
    s = scale_shape((rows, k), group_size)
    second = s if asym else (1,) if fmt == NVFP4 else None  # zero points, or nvfp4's global scale
    return (rows, packed_row_bytes(k, bits)), s, second
