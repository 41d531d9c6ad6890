"""Names and properties of every format AlphaQuant stores (bit layouts: csrc/include/alphaquant/formats.h)."""
from __future__ import annotations

from dataclasses import dataclass

INT_FORMATS = tuple(f"int{b}" for b in range(1, 9))
FLOAT_FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1")
# Code book formats: a code indexes a fixed table of values in [-1, 1]; scale = max|x| per group.
CODEBOOK_FORMATS = ("nf4",)
# MX block formats (OCP Microscaling v1.0): an element format and one E8M0 (power-of-two) scale
# byte per block of MX_BLOCK values; the element format and its largest power of two's exponent.
MX_BLOCK = 32
MX_ELEMENTS = {"mxfp8_e4m3": ("fp8_e4m3", 8), "mxfp8_e5m2": ("fp8_e5m2", 15), "mxfp6_e3m2": ("fp6_e3m2", 4),
               "mxfp6_e2m3": ("fp6_e2m3", 2), "mxfp4_e2m1": ("fp4_e2m1", 2), "mxint8": ("int8", 0)}
MX_FORMATS = tuple(MX_ELEMENTS)
MX_INT_SHIFT = 6  # an mxint8 element q stands for q * 2^-6
E8M0_BIAS = 127
# NVFP4: fp4_e2m1 values, one E4M3 scale byte per block of NVFP4_BLOCK values and one float32
# global scale per tensor, which the ops take in their zero_point argument (formats.h, "NVFP4").
NVFP4 = "nvfp4"
NVFP4_BLOCK = 16
NVFP4_FORMATS = (NVFP4,)
ALL_FORMATS = INT_FORMATS + FLOAT_FORMATS + CODEBOOK_FORMATS + MX_FORMATS + NVFP4_FORMATS
# Weight formats of the CPU int8-activation path (act_int8): values on an integer grid per group
# (csrc/cpu/int8_act_grid.h); group sizes a multiple of its activation block of 32, or 16 (two
# groups per block, as nvfp4's)
INT8_ACT_FORMATS = INT_FORMATS + ("mxint8", "fp4_e2m1", "mxfp4_e2m1", "nvfp4", "fp6_e2m3", "mxfp6_e2m3")
INT8_ACT_BLOCK = 32


def int8_act_takes(fmt: str, group_size: int) -> bool:
    """Whether a weight of this format and op group size (0 / -1: per channel / tensor) can run on
    the int8-activation path."""
    return fmt in INT8_ACT_FORMATS and (group_size <= 0 or group_size % INT8_ACT_BLOCK == 0
                                        or group_size == INT8_ACT_BLOCK // 2)
# Learned code books: 4-bit codes index 16 values fitted to each weight (or each of its rows) and
# stored beside codes and scales (alphaquant.quantizers.codebook). Not a fixed format, so not in
# ALL_FORMATS: the ops that take a format name do not take it; dequantize_codebook and
# linear_codebook take the table itself.
LEARNED_FORMATS = ("lut4",)
LEARNED_CODEBOOK_SIZE = 16


@dataclass(frozen=True)
class FloatFormatInfo:
    ebits: int
    mbits: int
    bias: int
    max_value: float
    has_nan: bool
    has_inf: bool

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits


FLOAT_INFO = {
    "fp8_e4m3": FloatFormatInfo(4, 3, 7, 448.0, True, False),
    "fp8_e5m2": FloatFormatInfo(5, 2, 15, 57344.0, True, True),
    "fp6_e3m2": FloatFormatInfo(3, 2, 3, 28.0, False, False),
    "fp6_e2m3": FloatFormatInfo(2, 3, 1, 7.5, False, False),
    "fp4_e2m1": FloatFormatInfo(2, 1, 1, 6.0, False, False),
}


# NF4 (4-bit NormalFloat of QLoRA / bitsandbytes): code c -> NF4_VALUES[c], the float32 values
# bitsandbytes defines (normal quantiles scaled to [-1, 1] with an exact 0), sorted.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
CODEBOOK_VALUES = {"nf4": NF4_VALUES}


def check_format(fmt: str) -> str:
    if fmt not in ALL_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(ALL_FORMATS)}")
    return fmt


def is_float_format(fmt: str) -> bool:
    return check_format(fmt) in FLOAT_FORMATS


def is_codebook_format(fmt: str) -> bool:
    return check_format(fmt) in CODEBOOK_FORMATS


def is_int_format(fmt: str) -> bool:
    return check_format(fmt) in INT_FORMATS


def is_mx_format(fmt: str) -> bool:
    return fmt in MX_FORMATS


def is_block_scaled(fmt: str) -> bool:
    """MX and NVFP4: a narrow scale byte per block of a size the format fixes."""
    return fmt in MX_FORMATS or fmt in NVFP4_FORMATS


def format_block(fmt: str) -> int:
    """Values per scale of a block-scaled format."""
    return MX_BLOCK if fmt in MX_FORMATS else NVFP4_BLOCK


def mx_element(fmt: str) -> str:
    """The element format of an MX format (mxfp4_e2m1 -> fp4_e2m1, mxint8 -> int8)."""
    return MX_ELEMENTS[fmt][0]


def format_max(fmt: str) -> float:
    """Largest value of a float or code book format: their scale is max|x| / format_max."""
    if is_int_format(fmt):
        raise ValueError(f"{fmt} is an integer format: its range depends on symmetry (int_range)")
    return FLOAT_INFO[fmt].max_value if fmt in FLOAT_INFO else max(CODEBOOK_VALUES[fmt])


def format_bits(fmt: str) -> int:
    """Bits per stored code."""
    if fmt in LEARNED_FORMATS:
        return (LEARNED_CODEBOOK_SIZE - 1).bit_length()
    check_format(fmt)
    if fmt in MX_ELEMENTS:
        return format_bits(mx_element(fmt))
    if fmt == NVFP4:
        return FLOAT_INFO["fp4_e2m1"].bits
    if fmt in FLOAT_INFO:
        return FLOAT_INFO[fmt].bits
    if fmt in CODEBOOK_VALUES:
        return (len(CODEBOOK_VALUES[fmt]) - 1).bit_length()
    return int(fmt[3:])


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of a b-bit integer format (csrc/include/alphaquant/formats.h)."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


# One-byte zero points of asymmetric b-bit integers (csrc/include/alphaquant/formats.h): byte c
# stands for z = c * 2^(b-7) - 2^(b-1), a grid of step 2^(b-7) codes over [-2^(b-1), 3 * 2^(b-1)),
# which holds every integer zero point and (for min/max ranges) every range that has 0 within
# half its width of it. int4: steps of 1/8 over [-8, 23.875].
def zero_grid(bits: int) -> tuple[float, float, float]:
    """(step, lowest, highest) zero point that a one-byte zero point of a ``bits``-bit int holds."""
    step, low = 2.0 ** (bits - 7), -(2.0 ** (bits - 1))
    return step, low, low + 255 * step


def encode_zero_points(zero, bits: int):
    """uint8 codes of float zero points (rounded to the nearest grid point, clamped into the grid)."""
    import torch

    step, low, high = zero_grid(bits)
    return torch.round((zero.float().clamp(low, high) - low) / step).to(torch.uint8)


def decode_zero_points(codes, bits: int):
    """float32 zero points of uint8 one-byte zero point codes."""
    import torch

    step, low, _ = zero_grid(bits)
    return codes.to(torch.float32) * step + low


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes of one packed row of k codes: ceil(k * bits / 8)."""
    return (k * bits + 7) // 8


def holds_nonfinite(fmt: str) -> bool:
    return fmt in ("fp8_e4m3", "fp8_e5m2")
