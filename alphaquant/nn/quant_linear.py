"""QuantLinear: a linear layer whose weight lives packed in low-bit bytes."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..formats import LEARNED_FORMATS
from ..packed import PackedTensor
from .int8_act_weight import Int8ActWeight, int8_act_call_applies
from .packed_weight import PackedWeightModule, _zero_dtype
from ..quantizers.base import BaseQuantizer
from ..algorithms.rotation import ATTR as ROTATION_ATTR, set_input_rotation


class QuantLinear(Int8ActWeight, PackedWeightModule):
    """y = quantize_activation(x) @ W.T + b, computed by torch.ops.alphaquant.linear.

    Buffers (all of the state_dict): ``weight_packed`` uint8 [out, ceil(in*bits/8)],
    ``weight_scale`` (float32, or float16/bfloat16 by the quantizer's scale_dtype),
    ``weight_zero_point`` (asymmetric ints only), ``weight_codebook`` (learned code books (lut4)
    only: [16] or [out, 16], float16 or float32; computed with torch.ops.alphaquant.linear_codebook)
    and ``bias``. No float copy of the weight is kept. The output has the input's dtype; gradients
    flow to the input (and to ``bias`` if it is made to require them), so adapters trained on top
    of the layer get theirs.

    The weight scales are checked (finite, > 0; zero points and code book values finite) once,
    when they are loaded (:meth:`load_packed`, ``load_state_dict``, or a conversion of their
    dtype), not at every forward; code that writes the buffers directly should call
    :meth:`check_scales`.

    ``scheme`` is the resolved plan scheme the layer was built from (alphaquant.plans), None when
    the layer was built directly. ``input_rotation="hadamard"`` makes the layer compute with
    x H (an orthogonal Hadamard matrix, applied before the activations are quantized), for layers
    of a rotated model (alphaquant.algorithms.rotation) whose weight was rotated to match.

    ``act_int8`` (plan key, or set the attribute): on the CPU, weights of a format in
    ``alphaquant.formats.INT8_ACT_FORMATS`` (integers, and fp4/fp6 E2M1/E2M3 with or without MX
    scales) compute with the activations quantized to int8 per block of 32 values and integer dot
    products
    (torch.ops.alphaquant.linear_int8_act); the weight's CPU layout is built on the first such
    call and then holds the codes in place of ``weight_packed``, which is rebuilt from it whenever
    it is asked for (alphaquant/nn/int8_act_weight.py; the state_dict is unchanged).
    Calls that need a gradient, other devices and other formats take the float-activation path.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, symmetric: bool, group_size: int,
                 act_quantizer: Optional[BaseQuantizer] = None, bias_dtype: torch.dtype = torch.float32,
                 device=None, scale_dtype: torch.dtype = torch.float32, scheme: Optional[dict] = None,
                 codebook_shape: Optional[tuple] = None, codebook_dtype: torch.dtype = torch.float16,
                 input_rotation: Optional[str] = None, zero_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if act_quantizer is not None and act_quantizer.fmt in LEARNED_FORMATS:
            raise ValueError(f"QuantLinear: a {act_quantizer.fmt} code book is fitted to a weight; it cannot "
                             f"quantize activations (use a fixed format or none)")
        self.in_features, self.out_features = in_features, out_features
        self.act_quantizer = act_quantizer
        self.scheme = scheme
        self.act_int8 = bool(scheme and scheme.get("act_int8"))
        self._init_int8_act_weight()  # the CPU layout, built when first used (int8_act_weight.py)
        self._init_packed_weight(out_features, in_features, fmt, symmetric, group_size, device, scale_dtype,
                                 codebook_shape, codebook_dtype, zero_dtype)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        set_input_rotation(self, input_rotation)

    @property
    def input_rotation(self) -> Optional[str]:
        return getattr(self, ROTATION_ATTR, None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, w_quantizer: BaseQuantizer,
                    a_quantizer: Optional[BaseQuantizer] = None, scheme: Optional[dict] = None) -> "QuantLinear":
        return cls.from_packed(linear, w_quantizer.quantize_weight(linear.weight), a_quantizer, scheme)

    @classmethod
    def from_packed(cls, linear: nn.Linear, packed: PackedTensor, a_quantizer: Optional[BaseQuantizer] = None,
                    scheme: Optional[dict] = None) -> "QuantLinear":
        """A layer with ``linear``'s shape and bias whose weight is ``packed`` (e.g. chosen by GPTQ)."""
        if tuple(packed.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"packed weight of shape {tuple(packed.shape)} does not fit a linear layer "
                             f"{linear.in_features} -> {linear.out_features}")
        cb = packed.codebook
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, packed.fmt, packed.symmetric,
                    packed.group_size, a_quantizer, linear.weight.dtype, linear.weight.device, packed.scale.dtype,
                    scheme=scheme, codebook_shape=None if cb is None else tuple(cb.shape),
                    codebook_dtype=torch.float16 if cb is None else cb.dtype,
                    input_rotation=getattr(linear, ROTATION_ATTR, None),
                    zero_dtype=_zero_dtype(packed))
        layer.load_packed(packed)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def _describe(self) -> str:
        return f"QuantLinear({self.in_features} -> {self.out_features})"

    def _int8_act_applies(self, x: torch.Tensor) -> bool:
        return int8_act_call_applies(self, x, self.fmt, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._int8_act_applies(x):
            if torch.compiler.is_compiling() and self._int8_act_weight is not None:
                # built by an eager call; no Python checks in a graph
                codes, params = self._int8_act_weight.codes, self._int8_act_weight.params
            else:
                codes, params = self._int8_act_layout()
            return ops._ops.linear_int8_act(x, codes, params, self.bias, self.fmt, self.group_size, self.out_features,
                                            self.in_features)
        xq = self.act_quantizer.quantize_activation(x) if self.act_quantizer is not None else x
        if self.weight_codebook is not None:
            y = ops.linear_codebook(xq, self.weight_packed, self.weight_scale, self.weight_codebook, self.bias,
                                    group_size=self.group_size, k=self.in_features, validate=False)
            return y.to(x.dtype)
        y = ops.linear(xq, self.weight_packed, self.weight_scale, self.weight_zero_point, self.bias, self.fmt,
                       symmetric=self.symmetric, group_size=self.group_size, k=self.in_features,
                       validate=False)  # checked once when loaded (check_scales)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        act = "float" if self.act_quantizer is None else self.act_quantizer.fmt
        rot = f", input_rotation={self.input_rotation}" if self.input_rotation else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight={self.fmt}"
                f"{'' if self.symmetric else ' asym'}, group_size={self.group_size}, activations={act}, "
                f"bias={self.bias is not None}{rot}{', act_int8=True' if self.act_int8 else ''}")

