"""Integer quantizers INT2..INT8 (symmetric [-2^(n-1), 2^(n-1)-1] or asymmetric [0, 2^n-1]); INT3 and INT5
fill the gaps for mixed precision under a size budget."""
from __future__ import annotations

from dataclasses import dataclass

from .base import BaseQuantizer, QuantizerConfig

ZERO_POINTS = ("float", "integer", "byte")


@dataclass
class IntConfig(QuantizerConfig):
    """symmetric: scale = max|x| / qmax, no zero point; else scale = (max - min) / (qmax - qmin) with a zero point.

    zero_point (asymmetric weights): "float" (default) keeps the zero point as computed; "integer"
    rounds it to an integer in the code range [0, 2^bits - 1] (and the codes are chosen with the
    rounded one), the zero point GPTQ and compressed-tensors store, so such a weight exports
    without loss; "byte" stores it in one byte, on a grid of 2^(bits-7) codes over
    [-2^(bits-1), 3 * 2^(bits-1)) (int4: eighths of a code; alphaquant.formats.zero_grid),
    which halves the zero points' share of fp16 storage (int4 g64: 4.375 bits/weight, not 4.5)."""

    symmetric: bool = True
    zero_point: str = "float"

    def __post_init__(self):
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"{type(self).__name__}.symmetric must be True or False; got {self.symmetric!r}")
        if self.zero_point not in ZERO_POINTS:
            raise ValueError(f"{type(self).__name__}.zero_point must be one of {ZERO_POINTS}; got {self.zero_point!r}")
        if self.zero_point != "float" and self.symmetric:
            raise ValueError(f"{type(self).__name__}.zero_point={self.zero_point!r} needs symmetric=False (symmetric "
                             f"formats have no zero point)")
        super().__post_init__()

    @property
    def integer_zero_point(self) -> bool:
        return self.zero_point == "integer"

    @property
    def byte_zero_point(self) -> bool:
        return self.zero_point == "byte"

    @property
    def asymmetric_int(self) -> bool:
        return not self.symmetric


@dataclass
class INT2Config(IntConfig):
    pass


@dataclass
class INT3Config(IntConfig):
    pass


@dataclass
class INT4Config(IntConfig):
    pass


@dataclass
class INT5Config(IntConfig):
    pass


@dataclass
class INT6Config(IntConfig):
    pass


@dataclass
class INT8Config(IntConfig):
    pass


class IntQuantizer(BaseQuantizer):
    bits = 8
    config_class = IntConfig

    @property
    def fmt(self) -> str:
        return f"int{self.bits}"

    @property
    def symmetric(self) -> bool:
        return self.config.symmetric

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


class INT2Quantizer(IntQuantizer):
    bits = 2
    config_class = INT2Config


class INT3Quantizer(IntQuantizer):
    bits = 3
    config_class = INT3Config


class INT4Quantizer(IntQuantizer):
    bits = 4
    config_class = INT4Config


class INT5Quantizer(IntQuantizer):
    bits = 5
    config_class = INT5Config


class INT6Quantizer(IntQuantizer):
    bits = 6
    config_class = INT6Config


class INT8Quantizer(IntQuantizer):
    bits = 8
    config_class = INT8Config
