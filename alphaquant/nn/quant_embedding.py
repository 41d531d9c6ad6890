"""QuantEmbedding: an embedding table stored packed; TiedQuantLinear: an LM head that computes
with that same table (tied weights stay one copy, in memory and on disk)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..packed import PackedTensor
from ..quantizers.base import BaseQuantizer
from .int8_act_weight import buffer_versions, int8_act_call_applies
from .packed_weight import PackedWeightModule, _zero_dtype


class QuantEmbedding(PackedWeightModule):
    """out = dequantize(table)[indices], computed by torch.ops.alphaquant.embedding, which decodes
    only the rows looked up.

    Buffers (all of the state_dict): those of :class:`PackedWeightModule` for the table
    [num_embeddings, embedding_dim], quantized per row (``group_size`` 0), per group or per tensor.
    The output dtype is ``dtype`` (the float embedding's). No gradient reaches the table;
    ``padding_idx`` is kept for the record (it only ever affected the table's gradient).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str, symmetric: bool, group_size: int,
                 dtype: torch.dtype = torch.float32, device=None, scale_dtype: torch.dtype = torch.float32,
                 scheme: Optional[dict] = None, codebook_shape: Optional[tuple] = None,
                 codebook_dtype: torch.dtype = torch.float16, padding_idx: Optional[int] = None,
                 zero_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype, self.scheme, self.padding_idx = dtype, scheme, padding_idx
        self._init_packed_weight(num_embeddings, embedding_dim, fmt, symmetric, group_size, device, scale_dtype,
                                 codebook_shape, codebook_dtype, zero_dtype)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, w_quantizer: BaseQuantizer,
                       scheme: Optional[dict] = None) -> "QuantEmbedding":
        return cls.from_packed(embedding, w_quantizer.quantize_weight(embedding.weight), scheme)

    @classmethod
    def from_packed(cls, embedding: nn.Embedding, packed: PackedTensor,
                    scheme: Optional[dict] = None) -> "QuantEmbedding":
        """A table with ``embedding``'s shape and dtype whose rows are ``packed``."""
        if tuple(packed.shape) != (embedding.num_embeddings, embedding.embedding_dim):
            raise ValueError(f"packed table of shape {tuple(packed.shape)} does not fit an embedding of "
                             f"{embedding.num_embeddings} x {embedding.embedding_dim}")
        if embedding.max_norm is not None:
            raise ValueError("QuantEmbedding: an embedding with max_norm renormalizes its rows in place; "
                             "it cannot be quantized")
        cb = packed.codebook
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, packed.fmt, packed.symmetric,
                    packed.group_size, embedding.weight.dtype, embedding.weight.device, packed.scale.dtype,
                    scheme=scheme, codebook_shape=None if cb is None else tuple(cb.shape),
                    codebook_dtype=torch.float16 if cb is None else cb.dtype, padding_idx=embedding.padding_idx,
                    zero_dtype=_zero_dtype(packed))
        layer.load_packed(packed)
        return layer

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self.weight_codebook is not None:
            return ops.embedding_codebook(indices, self.weight_packed, self.weight_scale, self.weight_codebook,
                                          group_size=self.group_size, k=self.embedding_dim, dtype=self.dtype,
                                          validate=False)
        return ops.embedding(indices, self.weight_packed, self.weight_scale, self.weight_zero_point, self.fmt,
                             symmetric=self.symmetric, group_size=self.group_size, k=self.embedding_dim,
                             dtype=self.dtype, validate=False)  # checked once when loaded (check_scales)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, weight={self.fmt}{'' if self.symmetric else ' asym'}, "
                f"group_size={self.group_size}, dtype={str(self.dtype).removeprefix('torch.')}")


class TiedQuantLinear(nn.Module):
    """The LM head of a model whose head is tied to its input embedding, once that embedding is a
    QuantEmbedding: y = x @ table.T (+ bias), with the embedding's own packed buffers.

    It holds no weight of its own (its state_dict has at most a bias), so the table is stored
    once; the embedding is referenced, not registered as a child, so it is moved, copied and
    saved once, with the module that owns it. ``act_int8`` (the head's plan scheme): on the CPU,
    compute with int8 activations as QuantLinear does; the table's CPU layout is then held beside
    the embedding's packed buffers, which the embedding's lookups read (the table's codes twice).
    """

    def __init__(self, embedding: QuantEmbedding, bias: Optional[torch.Tensor] = None,
                 act_quantizer: Optional[BaseQuantizer] = None, tied_to: str = "", act_int8: bool = False):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: one owner
        self.tied_to = tied_to  # the embedding's module name, recorded in checkpoints
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.act_quantizer = act_quantizer
        self.act_int8 = act_int8
        self._int8_act_weight = None  # (packed, scale, zero point, their versions, codes, params)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def embedding(self) -> QuantEmbedding:
        return self._embedding

    def _int8_act_applies(self, x: torch.Tensor) -> bool:
        e = self._embedding
        return e.weight_codebook is None and int8_act_call_applies(self, x, e.fmt, e.group_size)

    def _int8_act_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The table's CPU layout, rebuilt when the embedding's buffers changed (replaced, or in place:
        their versions; under inference_mode only replacement is seen)."""
        e = self._embedding
        wp, ws, wz = e.weight_packed, e.weight_scale, e.weight_zero_point
        versions = buffer_versions(wp, ws, wz)
        cached = self._int8_act_weight
        if cached is None or cached[0] is not wp or cached[1] is not ws or cached[2] is not wz or cached[3] != versions:
            codes, params = ops.int8_act_layout(wp, ws, wz, e.fmt, symmetric=e.symmetric, group_size=e.group_size,
                                                k=self.in_features)
            cached = self._int8_act_weight = (wp, ws, wz, versions, codes, params)
        return cached[4], cached[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self._embedding
        if self._int8_act_applies(x):
            if torch.compiler.is_compiling() and self._int8_act_weight is not None:
                codes, params = self._int8_act_weight[4], self._int8_act_weight[5]  # built by an eager call
            else:
                codes, params = self._int8_act_layout()
            return ops._ops.linear_int8_act(x, codes, params, self.bias, e.fmt, e.group_size, self.out_features,
                                            self.in_features)
        xq = self.act_quantizer.quantize_activation(x) if self.act_quantizer is not None else x
        if e.weight_codebook is not None:
            y = ops.linear_codebook(xq, e.weight_packed, e.weight_scale, e.weight_codebook, self.bias,
                                    group_size=e.group_size, k=self.in_features, validate=False)
        else:
            y = ops.linear(xq, e.weight_packed, e.weight_scale, e.weight_zero_point, self.bias, e.fmt,
                           symmetric=e.symmetric, group_size=e.group_size, k=self.in_features, validate=False)
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        self._int8_act_weight = None  # the embedding may have moved: rebuilt from its buffers
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._int8_act_weight = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tied_to={self.tied_to!r}"
                f"{', act_int8=True' if self.act_int8 else ''}")
