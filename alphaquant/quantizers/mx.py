"""MX quantizers (OCP Microscaling v1.0): blocks of 32 values sharing one E8M0 power-of-two scale
byte (bit layouts and the scale rule: csrc/include/alphaquant/formats.h, "MX block formats").

    MXFP4Quantizer(MXFP4Config(format="e2m1"))               4.25 bits per value
    MXFP6Quantizer(MXFP6Config(format="e3m2" or "e2m3"))     6.25
    MXFP8Quantizer(MXFP8Config(format="e4m3" or "e5m2"))     8.25
    MXINT8Quantizer(MXINT8Config())                          8.25

The block is fixed by the format: group_size is 32 and the granularity per group; scales are
chosen by the format's rule (no clip_search or zero_opt) and stored as uint8 E8M0 codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import ops
from ..formats import MX_BLOCK
from ..packed import PackedTensor
from .base import BaseQuantizer, BlockScaledConfig


@dataclass
class MXConfig(BlockScaledConfig):
    """Config of an MX quantizer: ``format`` names the element format."""

    group_size: int = MX_BLOCK
    format: str = ""

    formats = ()  # the element formats a subclass takes
    block = MX_BLOCK
    scale_bytes = "E8M0 bytes (powers of two)"

    def __post_init__(self):
        if self.format not in self.formats:
            raise ValueError(f"{type(self).__name__}.format must be one of {self.formats}; got {self.format!r}")
        super().__post_init__()


@dataclass
class MXFP4Config(MXConfig):
    format: str = "e2m1"
    formats = ("e2m1",)


@dataclass
class MXFP6Config(MXConfig):
    format: str = "e3m2"
    formats = ("e3m2", "e2m3")


@dataclass
class MXFP8Config(MXConfig):
    format: str = "e4m3"
    formats = ("e4m3", "e5m2")


@dataclass
class MXINT8Config(MXConfig):
    format: str = "int8"
    formats = ("int8",)


class MXQuantizer(BaseQuantizer):
    """Weights to packed MX codes with E8M0 scale bytes; activations fake-quantized the same way."""

    config_class = MXConfig
    family = ""

    @property
    def fmt(self) -> str:
        return "mxint8" if self.config.format == "int8" else f"mx{self.family}_{self.config.format}"

    def choose_weight_scales(self, weight: torch.Tensor, group_size: Optional[int] = None):
        """(E8M0 scale bytes, None): the format's rule, as :meth:`quantize_weight` picks them."""
        _, s, _ = ops.quantize(weight.detach(), self.fmt, symmetric=True, group_size=MX_BLOCK)
        return s, None

    def pack_with_scales(self, weight: torch.Tensor, scale: Optional[torch.Tensor],
                         zero_point: Optional[torch.Tensor] = None) -> PackedTensor:
        """Pack ``weight`` with E8M0 scale bytes (None: the format's rule picks them)."""
        w = weight.detach()
        if zero_point is not None:
            raise ValueError(f"{self.fmt} has no zero point")
        packed, s, _ = ops.quantize(w, self.fmt, symmetric=True, group_size=MX_BLOCK, scale=scale,
                                    stochastic=self.config.stochastic, seed=self._rounding_seed())
        return PackedTensor(packed, s, None, self.fmt, True, MX_BLOCK, tuple(w.shape), self.config.torch_dtype)

    def quantize_weight(self, weight: torch.Tensor) -> PackedTensor:
        if not torch.is_floating_point(weight):
            raise TypeError(f"quantize_weight expects a floating tensor; got {weight.dtype}")
        if self.static_scale is not None:
            raise ValueError(f"{type(self).__name__}: static scales are not supported for MX formats (the scale of "
                             f"each block follows from its values)")
        if not bool(torch.isfinite(weight).all()):  # the op would store such blocks as NaN: a broken weight
            raise ValueError(f"{type(self).__name__}: the weight holds NaN or Inf; its blocks would decode to NaN "
                             f"(MX's NaN scale). Fix the weight or keep the layer float")
        return self.pack_with_scales(weight, None)

    def attach_observer(self, observer) -> None:
        raise ValueError(f"{type(self).__name__}: MX formats take no observer (each block's scale follows from its "
                         f"own values); quantize activations dynamically")


class MXFP4Quantizer(MXQuantizer):
    bits = 4
    config_class = MXFP4Config
    family = "fp4"


class MXFP6Quantizer(MXQuantizer):
    bits = 6
    config_class = MXFP6Config
    family = "fp6"


class MXFP8Quantizer(MXQuantizer):
    bits = 8
    config_class = MXFP8Config
    family = "fp8"


class MXINT8Quantizer(MXQuantizer):
    bits = 8
    config_class = MXINT8Config
    family = "int8"
