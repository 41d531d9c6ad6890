"""NF4 quantizer: the 16-value NormalFloat code book of QLoRA / bitsandbytes, scaled per group by max|x|."""
from __future__ import annotations

from dataclasses import dataclass

from .base import BaseQuantizer, QuantizerConfig

NF4_FORMATS = ("nf4",)


@dataclass
class NF4Config(QuantizerConfig):
    """format: the code book ("nf4"). group_size defaults to 64, the block size of bitsandbytes."""

    format: str = "nf4"
    group_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.format not in NF4_FORMATS:
            raise ValueError(f"NF4Config.format must be one of {NF4_FORMATS}; got {self.format!r}")


class NF4Quantizer(BaseQuantizer):
    bits = 4
    config_class = NF4Config

    @property
    def fmt(self) -> str:
        return self.config.format
