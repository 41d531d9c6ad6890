"""FP8 quantizer: E4M3 (max 448, NaN, no Inf) or E5M2 (max 57344, Inf and NaN), scaled per group."""
from __future__ import annotations

from dataclasses import dataclass

from .base import BaseQuantizer, QuantizerConfig

FP8_FORMATS = ("e4m3", "e5m2")


@dataclass
class FP8Config(QuantizerConfig):
    format: str = "e4m3"

    def __post_init__(self):
        super().__post_init__()
        if self.format not in FP8_FORMATS:
            raise ValueError(f"FP8Config.format must be one of {FP8_FORMATS}; got {self.format!r}")


class FP8Quantizer(BaseQuantizer):
    bits = 8
    config_class = FP8Config

    @property
    def fmt(self) -> str:
        return f"fp8_{self.config.format}"
