"""FP4 quantizer: E2M1 (values 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives), scaled per group."""
from __future__ import annotations

from dataclasses import dataclass

from .base import BaseQuantizer, QuantizerConfig

FP4_FORMATS = ("e2m1",)


@dataclass
class FP4Config(QuantizerConfig):
    format: str = "e2m1"
    group_size: int = 32

    def __post_init__(self):
        super().__post_init__()
        if self.format not in FP4_FORMATS:
            raise ValueError(f"FP4Config.format must be one of {FP4_FORMATS}; got {self.format!r}")


class FP4Quantizer(BaseQuantizer):
    bits = 4
    config_class = FP4Config

    @property
    def fmt(self) -> str:
        return f"fp4_{self.config.format}"
