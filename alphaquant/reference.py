"""Pure-PyTorch reference of every native kernel: the oracle the tests hold the kernels to.

Written for clarity, not speed, but operation for operation the same float32 arithmetic as
csrc/include/alphaquant/quant_math.h, so integer and float codes match bit for bit.

This module keeps its own copy of every rule on purpose, including the group layout (which
alphaquant/layout.py and csrc/include/alphaquant/layout.h hold for the library) and the scale
formulas: an oracle that called the code under test would agree with it by construction.
"""
from __future__ import annotations

from typing import Optional

import torch

from .formats import (CODEBOOK_VALUES, FLOAT_INFO, MX_ELEMENTS, format_bits, format_max, holds_nonfinite,
                      int_range, is_codebook_format, is_float_format, is_int_format, is_mx_format)

_FLOAT_MAX = 3.4028234663852886e38
_M32 = 0xFFFFFFFF


# ---------------------------------------------------------------- packing

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., k] -> little-endian bit stream per row, ceil(k*bits/8) bytes."""
    k = codes.shape[-1]
    lead = codes.shape[:-1]
    c = codes.reshape(-1, k).to(torch.int64)
    pad = (-k) % 8
    c = torch.nn.functional.pad(c, (0, pad)).view(c.shape[0], -1, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # 8 codes -> one integer of 8*bits bits
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).reshape(c.shape[0], -1)
    return out[:, : (k * bits + 7) // 8].to(torch.uint8).reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    lead = packed.shape[:-1]
    p = packed.reshape(-1, packed.shape[-1]).to(torch.int64)
    nblocks = (k + 7) // 8
    p = torch.nn.functional.pad(p, (0, nblocks * bits - p.shape[-1])).view(p.shape[0], nblocks, bits)
    words = (p << (torch.arange(bits, dtype=torch.int64) * 8)).sum(-1)
    codes = (words.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return codes.reshape(p.shape[0], -1)[:, :k].to(torch.uint8).reshape(*lead, k)


# ---------------------------------------------------------------- random bits

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 without int64 overflow: split x into 16-bit halves.
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_bits(seed: int, index: torch.Tensor) -> torch.Tensor:
    """The kernels' per-element random bits (formats.h: random_bits), as int64 in [0, 2^32)."""
    seed &= (1 << 64) - 1
    index = index.to(torch.int64)
    hi = (index >> 32) & _M32
    key = _mix32(((seed >> 32) + hi) & _M32)
    key = _mix32((seed & _M32) ^ key)
    return _mix32((index & _M32) ^ key)


def _uniform01(bits: torch.Tensor) -> torch.Tensor:
    return (bits >> 8).to(torch.float32) * (2.0**-24)


# ---------------------------------------------------------------- float formats

def decode_float(codes: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    info = FLOAT_INFO[fmt]
    c = codes.to(torch.int64)
    m_bits, e_bits = info.mbits, info.ebits
    sign = torch.where((c >> (e_bits + m_bits)) & 1 == 1, -1.0, 1.0)
    e = (c >> m_bits) & ((1 << e_bits) - 1)
    m = (c & ((1 << m_bits) - 1)).to(torch.float32)
    sub = m * 2.0 ** (1 - info.bias - m_bits)
    norm = (1 + m * 2.0**-m_bits) * torch.pow(2.0, (e - info.bias).to(torch.float32))
    v = sign * torch.where(e == 0, sub, norm)
    mag = c & ((1 << (e_bits + m_bits)) - 1)
    top = (1 << e_bits) - 1
    if fmt == "fp8_e4m3":
        v = torch.where(mag == 0x7F, float("nan"), v)
    elif fmt == "fp8_e5m2":
        v = torch.where((e == top) & (m == 0), sign * float("inf"), v)
        v = torch.where((e == top) & (m != 0), float("nan"), v)
    return v.to(dtype)


def encode_float(
    x: torch.Tensor, fmt: str, noise: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """float -> uint8 codes of a float format; stochastic rounding when ``noise`` (int64 random bits) is given."""
    info = FLOAT_INFO[fmt]
    e_bits, m_bits, bias = info.ebits, info.mbits, info.bias
    xf = x.to(torch.float32)
    u = xf.view(torch.int32).to(torch.int64) & _M32
    sign = ((u >> 31) & 1) << (e_bits + m_bits)
    a = u & 0x7FFFFFFF
    mag_mask = (1 << (e_bits + m_bits)) - 1
    if fmt == "fp8_e4m3":
        max_mag = mag_mask - 1
    elif fmt == "fp8_e5m2":
        max_mag = ((mag_mask >> m_bits) << m_bits) - 1
    else:
        max_mag = mag_mask
    inf_mag = (mag_mask >> m_bits) << m_bits
    min_exp = 1 - bias
    drop = 23 - m_bits
    drop_mask = (1 << drop) - 1
    if noise is None:
        r = a + (drop_mask >> 1) + ((a >> drop) & 1)
    else:
        r = a + (noise & drop_mask)
    mag_normal = (r >> drop) - ((127 - bias) << m_bits)
    mag_normal = torch.where(r >= 0x7F800000, mag_mask + 1, mag_normal)
    scaled = a.to(torch.int32).view(torch.float32) * (2.0 ** (m_bits - min_exp))
    if noise is None:
        q = torch.round(scaled)
    else:
        q = torch.floor(scaled + _uniform01(noise))
    mag_sub = q.to(torch.int64)
    mag = torch.where(a >= ((min_exp + 127) << 23), mag_normal, mag_sub)
    mag = torch.where(mag > max_mag, inf_mag if fmt == "fp8_e5m2" else max_mag, mag)
    is_inf = a == 0x7F800000
    is_nan = a > 0x7F800000
    mag = torch.where(is_inf, inf_mag if fmt == "fp8_e5m2" else max_mag, mag)
    mag = torch.where(is_nan, mag_mask if info.has_nan else max_mag, mag)
    return (sign | mag).to(torch.uint8)


# ---------------------------------------------------------------- code book formats (nf4)

def _codebook(fmt: str) -> torch.Tensor:
    return torch.tensor(CODEBOOK_VALUES[fmt], dtype=torch.float32)


def decode_codebook(codes: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _codebook(fmt)[codes.to(torch.int64)].to(dtype)


def encode_codebook(x: torch.Tensor, fmt: str, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float -> uint8 codes of a code book format (x finite; beyond the table's ends saturates).

    Nearest: binary search among the float32 midpoints of neighbouring values, a value on a
    midpoint taking the lower code (bitsandbytes' rule). Stochastic (``noise`` given): between
    the neighbours lo <= x < hi, up when uniform < (x - lo) / (hi - lo).
    """
    values = _codebook(fmt)
    xf = x.to(torch.float32).contiguous()
    if noise is None:
        mids = (values[:-1] + values[1:]) / 2
        return torch.bucketize(xf, mids, right=False).to(torch.uint8)  # count of midpoints < x
    below = torch.bucketize(xf, values[1:], right=True)  # count of values[1:] <= x
    top = len(values) - 1
    lo = values[below.clamp(max=top - 1)]
    hi = values[(below + 1).clamp(max=top)]
    up = _uniform01(noise) < (xf - lo) / (hi - lo)
    return torch.where(below == top, below, below + up.to(torch.int64)).to(torch.uint8)


# ---------------------------------------------------------------- quantize

def _layout(shape, group_size: int):
    k = shape[-1]
    per_tensor = group_size == -1
    g = k if (group_size <= 0 or group_size >= k) else group_size
    return k, g, (k + g - 1) // g, per_tensor


def _qrange(fmt: str, symmetric: bool) -> tuple[float, float]:
    if not is_int_format(fmt):
        m = format_max(fmt)
        return -m, m
    qmin, qmax = int_range(format_bits(fmt), symmetric)
    return float(qmin), float(qmax)


def _check_finite(x: torch.Tensor, fmt: str) -> None:
    if not holds_nonfinite(fmt) and not torch.isfinite(x).all():
        raise ValueError(f"input contains NaN or Inf, which {fmt} cannot represent")


def group_scales(x: torch.Tensor, fmt: str, symmetric: bool, group_size: int):
    """Scales and zero points (float32, [..., groups]) from each group's finite min/max."""
    k, g, groups, per_tensor = _layout(x.shape, group_size)
    xf = x.to(torch.float32)
    xf = torch.where(torch.isfinite(xf), xf, torch.zeros((), dtype=torch.float32))
    if per_tensor:
        mn = xf.amin().reshape((1,) * x.dim())
        mx = xf.amax().reshape((1,) * x.dim())
    else:
        pad = groups * g - k
        lo = torch.nn.functional.pad(xf, (0, pad), value=float("inf"))
        hi = torch.nn.functional.pad(xf, (0, pad), value=float("-inf"))
        mn = lo.reshape(*x.shape[:-1], groups, g).amin(-1)
        mx = hi.reshape(*x.shape[:-1], groups, g).amax(-1)
    qmin, qmax = _qrange(fmt, symmetric)
    one = torch.ones((), dtype=torch.float32)
    if not is_int_format(fmt) or symmetric:
        amax = torch.maximum(mn.abs(), mx.abs())
        scale = amax / torch.tensor(qmax, dtype=torch.float32)
        scale = torch.where((scale > 0) & torch.isfinite(scale), scale, one)
        return scale, torch.zeros_like(scale)
    steps = torch.tensor(qmax - qmin, dtype=torch.float32)
    rng = mx - mn
    scale = rng / steps
    # max - min overflowed float32: divide first; int1 (one step) still overflows: the largest float32
    split = mx / steps - mn / steps
    split = torch.where(torch.isfinite(split), split, torch.tensor(_FLOAT_MAX, dtype=torch.float32))
    scale = torch.where(torch.isfinite(rng), scale, split)
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, one)
    zero = torch.tensor(qmin, dtype=torch.float32) - mn / scale
    return scale, zero


def _expand(params: torch.Tensor, shape, group_size: int) -> torch.Tensor:
    """Per-group parameters -> one per element of ``shape``."""
    k, g, groups, per_tensor = _layout(shape, group_size)
    if per_tensor:
        return params.reshape(()).expand(shape)
    return params.repeat_interleave(g, dim=-1)[..., :k]


def quantize_codes(
    x: torch.Tensor,
    fmt: str,
    symmetric: bool = True,
    group_size: int = 128,
    scale: Optional[torch.Tensor] = None,
    zero_point: Optional[torch.Tensor] = None,
    stochastic: bool = False,
    seed: int = 0,
):
    """(codes uint8 [..., k] unpacked, scale, zero) exactly as the kernels compute them."""
    if is_mx_format(fmt):
        return mx_quantize_codes(x, fmt, scale, stochastic, seed)
    _check_finite(x, fmt)
    if fmt == "nvfp4":
        return nvfp4_quantize_codes(x, scale, zero_point, stochastic, seed)
    if scale is None:
        scale, zero = group_scales(x, fmt, symmetric, group_size)
    else:
        scale = scale.to(torch.float32)
        zero = _zero_points(zero_point, fmt) if zero_point is not None else torch.zeros_like(scale)
    s = _expand(scale, x.shape, group_size)
    z = _expand(zero, x.shape, group_size)
    xf = x.to(torch.float32)
    noise = None
    if stochastic:
        noise = random_bits(seed, torch.arange(x.numel(), dtype=torch.int64).reshape(x.shape))
    if is_float_format(fmt):
        codes = encode_float(xf / s, fmt, noise)
    elif is_codebook_format(fmt):
        codes = encode_codebook(xf / s, fmt, noise)
    else:
        qmin, qmax = _qrange(fmt, symmetric)
        v = xf / s + z
        q = torch.floor(v + _uniform01(noise)) if stochastic else torch.round(v)
        codes = (q.clamp(qmin, qmax) - qmin).to(torch.uint8)
    return codes, scale, zero


def _zero_points(zero_point: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 zero points; uint8 ones are one-byte codes c: z = c * 2^(b-7) - 2^(b-1)."""
    if zero_point.dtype != torch.uint8:
        return zero_point.to(torch.float32)
    bits = format_bits(fmt)
    return zero_point.to(torch.float32) * 2.0 ** (bits - 7) - 2.0 ** (bits - 1)


# ---------------------------------------------------------------- MX block formats (OCP MX v1.0)

_MX_BLOCK = 32


def _blocks(x: torch.Tensor, fill: float) -> torch.Tensor:
    """[..., k] -> [..., ceil(k / 32), 32], the short last block padded with ``fill``."""
    k = x.shape[-1]
    n = -(-k // _MX_BLOCK)
    return torch.nn.functional.pad(x, (0, n * _MX_BLOCK - k), value=fill).reshape(*x.shape[:-1], n, _MX_BLOCK)


def mx_scale_codes(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """E8M0 scale bytes [..., blocks]: e = floor(log2(max|x| of the block)) - emax + 127, read from
    the float32 exponent field (0 and subnormal maxima count as 2^-127), clamped to 0..254."""
    amax = _blocks(x.to(torch.float32).abs(), 0.0).amax(-1)
    floor_log2 = ((amax.view(torch.int32) >> 23) & 0xFF) - 127
    emax = MX_ELEMENTS[fmt][1]
    return ((floor_log2 - emax).clamp(-127, 127) + 127).to(torch.uint8)


def mx_scale_values(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """The float32 scale each element is divided by: 2^(e - 127), times 2^-6 for mxint8 (exact:
    computed in float64, every such power of two is a float32 or a float32 subnormal)."""
    shift = 6 if MX_ELEMENTS[fmt][0] == "int8" else 0
    e = codes.to(torch.float64) - 127 - shift
    return torch.where(codes == 255, float("nan"), torch.pow(2.0, e)).to(torch.float32)


def mx_quantize_codes(x, fmt, scale=None, stochastic=False, seed=0):
    """(codes, E8M0 scale bytes, empty zero) of an MX format: element = x / X rounded to nearest
    even (or stochastically) and saturated to the element's largest finite value. A block holding
    NaN or Inf gets scale byte 255 (NaN), its elements coded as if those values were 0."""
    finite = torch.isfinite(x)
    if not finite.all():
        codes, scale_bytes, zero = mx_quantize_codes(torch.where(finite, x, torch.zeros_like(x)), fmt, scale,
                                                     stochastic, seed)
        nonfinite_block = _blocks((~finite).to(torch.uint8), 0).any(-1)
        return codes, torch.where(nonfinite_block, torch.full_like(scale_bytes, 255), scale_bytes), zero
    element = MX_ELEMENTS[fmt][0]
    codes_e8m0 = mx_scale_codes(x, fmt) if scale is None else scale
    k = x.shape[-1]
    s = mx_scale_values(codes_e8m0, fmt).repeat_interleave(_MX_BLOCK, dim=-1)[..., :k]
    v = x.to(torch.float32) / s
    noise = None
    if stochastic:
        noise = random_bits(seed, torch.arange(x.numel(), dtype=torch.int64).reshape(x.shape))
    if element == "int8":
        q = torch.floor(v + _uniform01(noise)) if stochastic else torch.round(v)
        codes = (q.clamp(-128, 127) + 128).to(torch.uint8)
    else:
        m = FLOAT_INFO[element].max_value
        codes = encode_float(v.clamp(-m, m), element, noise)
    return codes, codes_e8m0, torch.zeros(0)


def mx_dequantize_codes(codes, scale, fmt, dtype=torch.float32):
    element = MX_ELEMENTS[fmt][0]
    k = codes.shape[-1]
    s = mx_scale_values(scale, fmt).repeat_interleave(_MX_BLOCK, dim=-1)[..., :k]
    v = codes.to(torch.float32) - 128 if element == "int8" else decode_float(codes, element)
    return (v * s).to(dtype)


# ---------------------------------------------------------------- NVFP4 (compressed-tensors' recipe)

_NVFP4_BLOCK = 16


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """float32 [1]: 448 * 6 / max|x| (max|x| at least the smallest normal float32), 1 if not finite."""
    amax = x.to(torch.float32).abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    g = torch.tensor([448.0 * 6.0]) / amax
    return torch.where(torch.isfinite(g), g, torch.ones_like(g))


def nvfp4_scale_codes(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes [..., blocks]: (max|x| of the block / 6) * g, saturated at 448, rounded to
    nearest even by torch's float8_e4m3fn cast; a zero byte becomes 0.125's (0x20)."""
    k = x.shape[-1]
    n = -(-k // _NVFP4_BLOCK)
    padded = torch.nn.functional.pad(x.to(torch.float32).abs(), (0, n * _NVFP4_BLOCK - k))
    amax = padded.reshape(*x.shape[:-1], n, _NVFP4_BLOCK).amax(-1)
    s = ((amax / 6.0) * global_scale.to(torch.float32)).clamp(max=448.0)
    codes = s.to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(codes == 0, torch.full_like(codes, 0x20), codes)


def nvfp4_scale_values(codes: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """float32 block scales S = float(E4M3 byte) / g."""
    return codes.view(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32) / global_scale.to(torch.float32)


def nvfp4_quantize_codes(x, scale=None, global_scale=None, stochastic=False, seed=0):
    """(codes, E4M3 scale bytes, global scale [1]): element = x / S rounded to nearest even (or
    stochastically), saturated to +-6."""
    g = nvfp4_global_scale(x) if global_scale is None else global_scale.to(torch.float32).reshape(1)
    codes_e4m3 = nvfp4_scale_codes(x, g) if scale is None else scale.view(torch.uint8)
    k = x.shape[-1]
    s = nvfp4_scale_values(codes_e4m3, g).repeat_interleave(_NVFP4_BLOCK, dim=-1)[..., :k]
    noise = None
    if stochastic:
        noise = random_bits(seed, torch.arange(x.numel(), dtype=torch.int64).reshape(x.shape))
    codes = encode_float((x.to(torch.float32) / s).clamp(-6.0, 6.0), "fp4_e2m1", noise)
    return codes, codes_e4m3, g


def nvfp4_dequantize_codes(codes, scale, global_scale, dtype=torch.float32):
    k = codes.shape[-1]
    s = nvfp4_scale_values(scale, global_scale.reshape(1)).repeat_interleave(_NVFP4_BLOCK, dim=-1)[..., :k]
    return (decode_float(codes, "fp4_e2m1") * s).to(dtype)


def quantize(x, fmt, symmetric=True, group_size=128, scale=None, zero_point=None, stochastic=False, seed=0):
    """Reference of torch.ops.alphaquant.quantize: (packed, scale, zero_point); nvfp4 returns its
    global scale as zero_point."""
    codes, scale, zero = quantize_codes(x, fmt, symmetric, group_size, scale, zero_point, stochastic, seed)
    asym = is_int_format(fmt) and not symmetric
    return pack(codes, format_bits(fmt)), scale, (zero if asym or fmt == "nvfp4" else torch.empty(0))


def dequantize_codes(codes, scale, zero_point, fmt, symmetric=True, group_size=128, dtype=torch.float32):
    if is_mx_format(fmt):
        return mx_dequantize_codes(codes, scale, fmt, dtype)
    if fmt == "nvfp4":
        return nvfp4_dequantize_codes(codes, scale, zero_point, dtype)
    s = _expand(scale.to(torch.float32), codes.shape, group_size)
    if is_float_format(fmt):
        return (decode_float(codes, fmt) * s).to(dtype)
    if is_codebook_format(fmt):
        return (decode_codebook(codes, fmt) * s).to(dtype)
    qmin, _ = _qrange(fmt, symmetric)
    z = _expand(_zero_points(zero_point, fmt), codes.shape, group_size) if zero_point is not None and zero_point.numel() else 0.0
    # saturated: the top code times a scale from a maximum near the float32 limit can round past it
    v = ((codes.to(torch.float32) + qmin - z) * s).clamp(-_FLOAT_MAX, _FLOAT_MAX)
    return v.to(dtype)


def dequantize(packed, scale, zero_point, fmt, symmetric=True, group_size=128, k=None, dtype=torch.float32):
    codes = unpack(packed, format_bits(fmt), k)
    return dequantize_codes(codes, scale, zero_point, fmt, symmetric, group_size, dtype)


def quantization_error(x, packed, scale, zero_point, fmt, symmetric=True, group_size=128):
    """Reference of torch.ops.alphaquant.quantization_error: float64 (sum x^2, sum (x - deq)^2)."""
    xf = x.cpu().to(torch.float32)
    deq = dequantize(packed.cpu(), scale.cpu(), None if zero_point is None else zero_point.cpu(), fmt, symmetric,
                     group_size, x.shape[-1])
    return torch.stack([xf.double().square().sum(), (xf - deq).double().square().sum()])


def fake_quantize(x, fmt, symmetric=True, group_size=128, scale=None, zero_point=None, stochastic=False, seed=0):
    codes, scale, zero = quantize_codes(x, fmt, symmetric, group_size, scale, zero_point, stochastic, seed)
    return dequantize_codes(codes, scale, zero, fmt, symmetric, group_size, x.dtype)


def linear(x, packed, scale, zero_point, bias, fmt, symmetric=True, group_size=128, k=None):
    """float32 dequantize-then-matmul: the oracle of torch.ops.alphaquant.linear."""
    w = dequantize(packed.cpu(), scale.cpu(), None if zero_point is None else zero_point.cpu(), fmt,
                   symmetric, group_size, k, torch.float32)
    b = None if bias is None else bias.cpu().to(torch.float32)
    return torch.nn.functional.linear(x.cpu().to(torch.float32), w, b)



def quantize_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """x as the int8-activation path sees it: symmetric int8 per block of 32 values along the last
    dimension (the quantize op's "int8", group_size 32), dequantized to float32."""
    return fake_quantize(x.to(torch.float32), "int8", True, 32)


def linear_int8_act(x, packed, scale, zero_point, bias, fmt, symmetric=True, group_size=128, k=None):
    """Oracle of torch.ops.alphaquant.linear_int8_act, from the plain packed weight: the dequantized
    weight times the int8-quantized activations, in float64 (the kernel sums in float32)."""
    w = dequantize(packed.cpu(), scale.cpu(), None if zero_point is None else zero_point.cpu(), fmt,
                   symmetric, group_size, k, torch.float32).double()
    y = quantize_activations_int8(x.cpu()).double() @ w.T
    return y if bias is None else y + bias.cpu().double()

def int8_act_unlayout(codes: torch.Tensor, fmt: str, n: int, k: int) -> torch.Tensor:
    """Reference of torch.ops.alphaquant.int8_act_unlayout: the packed rows of the weight [n, k] whose
    CPU layout codes (csrc/cpu/int8_act_layout.h) are ``codes`` [tiles, kblocks, 16*32*sbits/8].
    Byte fields of fp6 E2M3 hold grid values u = 8v + 60, read back to the lowest code of that value."""
    bits = format_bits(fmt)
    sbits = 2 if bits <= 2 else 4 if bits <= 4 else 8
    fields = 8 // sbits
    tiles, kblocks, _ = codes.shape
    # byte 4*row + i of word p, field s holds (row, 32*block + 4*(fields*p + s) + i)
    words = codes.reshape(tiles, kblocks, sbits, 16, 4).to(torch.int64)  # [t, b, p, row, i]
    shifts = torch.arange(fields) * sbits
    f = (words.unsqueeze(-1) >> shifts) & ((1 << sbits) - 1)  # [t, b, p, row, i, s]
    f = f.permute(0, 3, 1, 2, 5, 4)  # [t, row, b, p, s, i]: column 32*b + 4*(fields*p + s) + i
    rows = f.reshape(tiles * 16, kblocks * 32)[:n, :k]
    if sbits == 8 and fmt in ("fp6_e2m3", "mxfp6_e2m3"):
        values = decode_float(torch.arange(1 << bits, dtype=torch.uint8), "fp6_e2m3")
        code_of = torch.zeros(256, dtype=torch.int64)
        for c in reversed(range(1 << bits)):  # the lowest code of a value wins
            code_of[int(values[c] * 8 + 60)] = c
        rows = code_of[rows]
    return pack(rows.to(torch.uint8), bits)

# ---------------------------------------------------------------- learned code books (lut4)

def dequantize_codebook(packed, scale, codebook, group_size=64, k=None, dtype=torch.float32):
    """Reference of torch.ops.alphaquant.dequantize_codebook: codebook[row or 0][code] * scale."""
    codes = unpack(packed, 4, k).to(torch.int64)
    table = codebook.to(torch.float32)
    if table.dim() == 1:
        values = table[codes]
    else:
        values = torch.gather(table, -1, codes)
    return (values * _expand(scale.to(torch.float32), codes.shape, group_size)).to(dtype)


def linear_codebook(x, packed, scale, codebook, bias, group_size=64, k=None):
    """float32 dequantize-then-matmul: the oracle of torch.ops.alphaquant.linear_codebook."""
    w = dequantize_codebook(packed.cpu(), scale.cpu(), codebook.cpu(), group_size, k, torch.float32)
    b = None if bias is None else bias.cpu().to(torch.float32)
    return torch.nn.functional.linear(x.cpu().to(torch.float32), w, b)


# ---------------------------------------------------------------- embeddings

def embedding(indices, packed, scale, zero_point, fmt, symmetric=True, group_size=128, k=None, dtype=torch.float32):
    """Reference of torch.ops.alphaquant.embedding: the whole table dequantized, then indexed."""
    table = dequantize(packed.cpu(), scale.cpu(), None if zero_point is None else zero_point.cpu(), fmt, symmetric,
                       group_size, k, torch.float32)
    return torch.nn.functional.embedding(indices.cpu().to(torch.int64), table).to(dtype)


def embedding_codebook(indices, packed, scale, codebook, group_size=64, k=None, dtype=torch.float32):
    """Reference of torch.ops.alphaquant.embedding_codebook."""
    table = dequantize_codebook(packed.cpu(), scale.cpu(), codebook.cpu(), group_size, k, torch.float32)
    return torch.nn.functional.embedding(indices.cpu().to(torch.int64), table).to(dtype)
