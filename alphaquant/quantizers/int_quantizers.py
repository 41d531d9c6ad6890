"""Integer quantizers INT2..INT8 (symmetric [-2^(n-1), 2^(n-1)-1] or asymmetric [0, 2^n-1]); INT3 and INT5
fill the gaps for mixed precision under a size budget."""
from __future__ import annotations

from dataclasses import dataclass

from .base import BaseQuantizer, QuantizerConfig


@dataclass
class IntConfig(QuantizerConfig):
    """symmetric: scale = max|x| / qmax, no zero point; else scale = (max - min) / (qmax - qmin) with a zero point."""

    symmetric: bool = True

    def __post_init__(self):
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"{type(self).__name__}.symmetric must be True or False; got {self.symmetric!r}")
        super().__post_init__()

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
