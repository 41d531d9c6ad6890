"""NVFP4 quantizer: fp4_e2m1 values, one E4M3 scale byte per block of 16 values and one float32
global scale per tensor, compressed-tensors' recipe (the checkpoints vLLM loads; bit layout and
scale rule: csrc/include/alphaquant/formats.h, "NVFP4").

    NVFP4Quantizer(NVFP4Config())          4.5 bits per value

The global scale is 448 * 6 / max|w| unless given (``global_scale``: one value shared by several
weights). It is stored beside the scale bytes; the ops take it as their zero_point argument.
Serving engines fuse q/k/v and gate/up projections into one matrix that keeps one global scale
(vLLM takes the largest of the parts'), so plans give such siblings one shared global scale
(:func:`fused_global_scales`), as llm-compressor does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from .. import ops
from ..formats import NVFP4, NVFP4_BLOCK
from ..packed import PackedTensor
from .base import BaseQuantizer, BlockScaledConfig


@dataclass
class NVFP4Config(BlockScaledConfig):
    """Config of :class:`NVFP4Quantizer`: the block (16) and the scale rule are the format's."""

    group_size: int = NVFP4_BLOCK

    block = NVFP4_BLOCK
    scale_bytes = "E4M3 bytes (and one float32 global scale)"

    @property
    def zero_point_dtype(self) -> torch.dtype:
        return torch.float32  # the global scale, in the zero point's place


class NVFP4Quantizer(BaseQuantizer):
    """Weights to packed E2M1 codes with E4M3 block scale bytes and a global scale; activations
    fake-quantized the same way (a global scale per call, as dynamic NVFP4 activations)."""

    bits = 4
    config_class = NVFP4Config

    @property
    def fmt(self) -> str:
        return NVFP4

    def choose_weight_scales(self, weight: torch.Tensor, group_size: Optional[int] = None,
                             global_scale: Optional[torch.Tensor] = None):
        """(E4M3 scale bytes, global scale [1]) as :meth:`quantize_weight` picks them."""
        _, s, g = ops.quantize(weight.detach(), NVFP4, symmetric=True, group_size=NVFP4_BLOCK,
                               zero_point=_as_global(global_scale, weight))
        return s, g

    def pack_with_scales(self, weight: torch.Tensor, scale: Optional[torch.Tensor],
                         zero_point: Optional[torch.Tensor] = None) -> PackedTensor:
        """Pack ``weight`` with E4M3 scale bytes (None: the format's rule) under the global scale
        ``zero_point`` (None: 448 * 6 / max|weight|)."""
        w = weight.detach()
        packed, s, g = ops.quantize(w, NVFP4, symmetric=True, group_size=NVFP4_BLOCK, scale=scale,
                                    zero_point=_as_global(zero_point, w), stochastic=self.config.stochastic,
                                    seed=self._rounding_seed())
        return PackedTensor(packed, s, g, NVFP4, True, NVFP4_BLOCK, tuple(w.shape), self.config.torch_dtype)

    def quantize_weight(self, weight: torch.Tensor, global_scale: Optional[torch.Tensor] = None) -> PackedTensor:
        if not torch.is_floating_point(weight):
            raise TypeError(f"quantize_weight expects a floating tensor; got {weight.dtype}")
        if self.static_scale is not None:
            raise ValueError("NVFP4Quantizer: static scales are not supported (each block's scale follows from its "
                             "values); pass global_scale to fix the tensor's scale")
        return self.pack_with_scales(weight, None, global_scale)

    def attach_observer(self, observer) -> None:
        raise ValueError("NVFP4Quantizer: nvfp4 takes no observer (each block's scale follows from its own values); "
                         "quantize activations dynamically")


def _as_global(g: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    if g is None:
        return None
    g = torch.as_tensor(g, dtype=torch.float32, device=like.device).reshape(-1)
    if g.numel() != 1 or not bool(torch.isfinite(g).all() and (g > 0).all()):
        raise ValueError(f"NVFP4Quantizer: global_scale must be one finite value > 0; got {g.tolist()}")
    return g


# Sibling linears that serving engines fuse into one matrix with one global scale.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def global_scale_for(amax: float) -> torch.Tensor:
    """float32 [1]: 448 * 6 / amax (amax at least the smallest normal float32), 1 where that is
    not finite: the rule the quantize op applies to one tensor's max|w|."""
    g = torch.tensor([448.0 * 6.0]) / torch.tensor([amax], dtype=torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(torch.isfinite(g), g, torch.ones_like(g))


def fused_global_scales(names: Iterable[str], amax: Callable[[str], float]) -> dict:
    """{layer name: shared global scale} for the nvfp4 layers ``names`` that have fused siblings
    among them (same parent, names in one FUSED_SIBLINGS set): the rule applied to the largest
    max|w| of the group, i.e. the smallest of the parts' own global scales. ``amax(name)`` gives a
    layer's max|w|; layers without siblings are left out (they keep their own)."""
    groups: dict = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for i, siblings in enumerate(FUSED_SIBLINGS):
            if leaf in siblings:
                groups.setdefault((parent, i), []).append(name)
    shared = {}
    for members in groups.values():
        if len(members) > 1:
            g = global_scale_for(max(amax(n) for n in members))
            shared.update({n: g for n in members})
    return shared
