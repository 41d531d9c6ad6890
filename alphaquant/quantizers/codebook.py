"""Learned 4-bit code book quantizer (lut4): 16 values fitted to each weight by weighted k-means.

Each group of the weight is normalized by its max|x| (the scale, as for nf4), and 16 values are
fitted to the normalized weights of the whole tensor (or of each output channel) by Lloyd's
algorithm started from the NF4 table. An element of group g weighs ``importance * scale_g**2``
in the fit: with that weight the k-means objective is exactly the (importance-weighted) squared
error of the dequantized weights, so groups of small weights do not pull the values their way
more than their error is worth. ``importance`` is optional and per element, e.g. a diagonal
Hessian estimate (mean squared input activation per input feature, broadcast over the rows)
from calibration, which makes the fit sensitivity-weighted.

Stored: 4-bit codes (two a byte), the scales, and the code book ([16] or [out, 16], float16 or
float32). The codes are assigned with the code book as stored (rounded to its dtype), so what
is stored is what is computed with. Kernels: torch.ops.alphaquant.dequantize_codebook and
linear_codebook.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import ops
from .._logging import logger
from ..formats import LEARNED_CODEBOOK_SIZE, NF4_VALUES
from ..packed import PackedTensor
from .base import DTYPES, BaseQuantizer, QuantizerConfig

CODEBOOK_GRANULARITIES = ("per_tensor", "per_channel")
CODEBOOK_DTYPES = ("float16", "float32")


@dataclass
class CodebookConfig(QuantizerConfig):
    """codebook_granularity: one code book for the tensor ("per_tensor") or one per output
    channel, i.e. per row ("per_channel", 32 bytes a row in float16). codebook_dtype: storage of
    the 16 values ("float16" or "float32"). iterations: most Lloyd iterations (the fit stops
    early once no assignment changes). group_size / granularity: of the scales, as for nf4."""

    group_size: int = 64
    codebook_granularity: str = "per_tensor"
    codebook_dtype: str = "float16"
    iterations: int = 25

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.codebook_granularity not in CODEBOOK_GRANULARITIES:
            raise ValueError(f"{name}.codebook_granularity must be one of {CODEBOOK_GRANULARITIES}; got "
                             f"{self.codebook_granularity!r}")
        if self.codebook_dtype not in CODEBOOK_DTYPES:
            raise ValueError(f"{name}.codebook_dtype must be one of {CODEBOOK_DTYPES}; got {self.codebook_dtype!r}")
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or not 0 <= self.iterations <= 1000:
            raise ValueError(f"{name}.iterations must be an int in [0, 1000]; got {self.iterations!r}")
        if self.stochastic:
            raise ValueError(f"{name}.stochastic: a learned code book is assigned by nearest value only; "
                             f"stochastic rounding is available for the fixed formats (nf4, fp4, int)")
        if self.clip_search:
            raise ValueError(f"{name}.clip_search: the k-means fit already places the values (its extreme values "
                             f"move inward when that lowers the error); clip_search is for the fixed formats")


def nearest_codes(u: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest value of a sorted ``codebook`` for each element of ``u``: one
    code book [16] for all of ``u``, or [R, 16] for the R rows of ``u`` [R, N].

    A value on a midpoint takes the lower code (as nf4 does).
    """
    mids = (codebook[..., :-1] + codebook[..., 1:]) / 2
    return torch.searchsorted(mids.contiguous(), u.contiguous(), right=False)


def fit_codebook(u: torch.Tensor, weight: torch.Tensor, iterations: int) -> torch.Tensor:
    """Weighted k-means (Lloyd's) of ``u`` [R, N] with element weights ``weight`` [R, N] >= 0:
    R sorted code books [R, 16] in float32, started from the NF4 table.

    Each iteration assigns every value to its nearest centroid and moves each centroid to the
    weighted mean of its values, which never increases sum(weight * (u - centroid)^2); a
    centroid without (weighted) values keeps its place.
    """
    rows = u.shape[0]
    c = torch.tensor(NF4_VALUES, dtype=torch.float32, device=u.device).expand(rows, -1).contiguous()
    wu = weight * u
    assign = None
    for it in range(iterations):
        new = nearest_codes(u, c)
        if assign is not None and torch.equal(new, assign):
            logger.debug("lut4 k-means converged after %d iterations", it)
            break
        assign = new
        wsum = torch.zeros_like(c).scatter_add_(1, assign, weight)
        wusum = torch.zeros_like(c).scatter_add_(1, assign, wu)
        c = torch.where(wsum > 0, wusum / wsum.clamp(min=torch.finfo(torch.float32).tiny), c)
        c = c.sort(dim=1).values  # an empty cluster's old value can sit out of order
    return c


class CodebookQuantizer(BaseQuantizer):
    """Weights only: the code book is fitted to one weight, so there is nothing to fit for
    activations (``quantize_activation`` raises)."""

    bits = 4
    config_class = CodebookConfig

    @property
    def fmt(self) -> str:
        return "lut4"

    def attach_observer(self, observer) -> None:
        raise TypeError(self._weights_only())

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(self._weights_only())

    def _weights_only(self) -> str:
        return ("CodebookQuantizer (lut4) quantizes weights only: its code book is fitted to one weight tensor; "
                "use a fixed format (int8, fp8, nf4, ...) or none for activations")

    def quantize_weight(self, weight: torch.Tensor, importance: Optional[torch.Tensor] = None) -> PackedTensor:
        """Fit the code book to ``weight`` [..., k] and pack it (4-bit codes, scales, code book).

        importance: optional non-negative per-element weights of the fit, broadcastable to
        ``weight`` (e.g. a diagonal Hessian [k] or [out, k]); None weighs every element alike.
        """
        scale, codebook = self.fit(weight, importance)
        return self.pack_values(weight, scale, codebook)

    def fit(self, weight: torch.Tensor, importance: Optional[torch.Tensor] = None):
        """(scales float32 as stored, code book as stored: [16] or [..., 16]) for ``weight``."""
        cfg = self.config
        if not torch.is_floating_point(weight):
            raise TypeError(f"quantize_weight expects a floating tensor; got {weight.dtype}")
        w = weight.detach()
        if w.dim() < 1 or w.numel() == 0:
            raise ValueError(f"lut4: expected a non-empty weight with at least one dimension; got shape "
                             f"{tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ValueError("lut4: the weight holds NaN or Inf, which a code book cannot represent")
        gs = cfg.op_group_size
        # The group's max|x| (format max 1): the scale rule of nf4, from the native kernel.
        _, scale, _ = ops.quantize(w, "nf4", group_size=gs)
        sdt = DTYPES[cfg.scale_dtype]
        if sdt != torch.float32:
            scale = scale.clamp(min=torch.finfo(sdt).tiny).to(sdt).float()  # computed with as stored
        k = w.shape[-1]
        s = _per_element(scale, w.shape, gs)
        u = (w.to(torch.float32) / s).clamp(-1.0, 1.0).reshape(-1, k)  # rounding can pass +-1 by an ulp
        rel = s / scale.max()  # scale**2 relative to the largest: no overflow or underflow of the square
        fit_weight = (rel * rel).reshape(-1, k)
        if importance is not None:
            fit_weight = fit_weight * _checked_importance(importance, w)
        per_row = cfg.codebook_granularity == "per_channel"
        fit_u, fit_w = (u, fit_weight) if per_row else (u.reshape(1, -1), fit_weight.reshape(1, -1))
        codebook = fit_codebook(fit_u, fit_w, cfg.iterations).to(DTYPES[cfg.codebook_dtype])
        stored = codebook.reshape(tuple(w.shape[:-1]) + (LEARNED_CODEBOOK_SIZE,)) if per_row \
            else codebook.reshape(LEARNED_CODEBOOK_SIZE)
        return scale, stored.contiguous()

    def nearest(self, x: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Codes (int64) of ``x`` [rows, n] for per-row ``scale`` [rows, 1] and a code book [16] or
        [rows, 16]: the nearest value of x / scale."""
        u = (x.to(torch.float32) / scale).clamp(-1.0, 1.0)
        return nearest_codes(u, codebook.float())

    def pack_values(self, weight: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor) -> PackedTensor:
        """Pack ``weight`` with given scales (as :meth:`fit` gives them) and code book: each value
        takes the nearest code (values already on the grid keep their codes)."""
        cfg = self.config
        w = weight.detach()
        gs, k = cfg.op_group_size, w.shape[-1]
        s = _per_element(scale, w.shape, gs)
        u = (w.to(torch.float32) / s).clamp(-1.0, 1.0).reshape(-1, k)
        table = codebook.float().reshape(-1, LEARNED_CODEBOOK_SIZE)
        table = table if table.shape[0] > 1 else table.reshape(LEARNED_CODEBOOK_SIZE)
        codes = nearest_codes(u, table).to(torch.uint8).reshape(w.shape)
        packed = ops.pack(codes, self.bits)
        return PackedTensor(packed, scale.to(DTYPES[cfg.scale_dtype]), None, self.fmt, True, gs, tuple(w.shape),
                            cfg.torch_dtype, codebook=codebook.contiguous())


def _per_element(scale: torch.Tensor, shape, group_size: int) -> torch.Tensor:
    """Scales [..., groups] (all ones per tensor) -> one per element of ``shape``."""
    k = shape[-1]
    if group_size == -1:
        return scale.reshape(()).expand(shape)
    g = k if group_size <= 0 or group_size >= k else group_size
    return scale.repeat_interleave(g, dim=-1)[..., :k]


def _checked_importance(importance, w: torch.Tensor) -> torch.Tensor:
    imp = torch.as_tensor(importance, device=w.device)
    if not torch.is_floating_point(imp):
        imp = imp.to(torch.float32)
    try:
        imp = torch.broadcast_to(imp.to(torch.float32), w.shape)
    except RuntimeError:
        raise ValueError(f"lut4: importance of shape {tuple(imp.shape)} does not broadcast to the weight's shape "
                         f"{tuple(w.shape)}") from None
    if not (torch.isfinite(imp).all() and (imp >= 0).all()):
        raise ValueError("lut4: importance must be finite and >= 0 everywhere")
    return imp.reshape(-1, w.shape[-1])
