"""PackedTensor: a quantized tensor stored in its real low-bit bytes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import ops
from .formats import LEARNED_CODEBOOK_SIZE, LEARNED_FORMATS, NVFP4, check_format, format_bits
from .layout import scale_shape


@dataclass
class PackedTensor:
    """Packed codes plus what is needed to read them back.

    data: uint8 [..., ceil(k*bits/8)] (one bit stream per row, see formats.h); scale / zero_point:
    float32 [..., groups] ([1, ..] per tensor; zero_point None unless asymmetric int; block-scaled
    formats: scale bytes, and for nvfp4 the float32 global scale [1] as zero_point); shape: the
    original shape; dtype: what :meth:`dequantize` returns by default; codebook: the 16 values of a
    learned code book format (``lut4``), [16] or one per row [..., 16], None for every other format.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    fmt: str
    symmetric: bool
    group_size: int
    shape: tuple
    dtype: torch.dtype = torch.float32
    codebook: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.fmt in LEARNED_FORMATS:
            per_row = tuple(self.shape[:-1]) + (LEARNED_CODEBOOK_SIZE,)
            if (not isinstance(self.codebook, torch.Tensor) or not torch.is_floating_point(self.codebook)
                    or tuple(self.codebook.shape) not in ((LEARNED_CODEBOOK_SIZE,), per_row)):
                raise ValueError(f"PackedTensor({self.fmt}) needs a floating codebook of shape "
                                 f"[{LEARNED_CODEBOOK_SIZE}] or {list(per_row)}; got "
                                 f"{getattr(self.codebook, 'shape', self.codebook)!r}")
        else:
            check_format(self.fmt)
            if self.codebook is not None:
                raise ValueError(f"PackedTensor.codebook is only for learned code book formats {LEARNED_FORMATS}; "
                                 f"{self.fmt} has its values built in")
        if not isinstance(self.data, torch.Tensor) or self.data.dtype != torch.uint8:
            raise TypeError(f"PackedTensor.data must be a uint8 tensor; got {getattr(self.data, 'dtype', self.data)!r}")
        expected = scale_shape(self.shape, self.group_size)
        if tuple(self.scale.shape) != expected:
            raise ValueError(f"PackedTensor.scale has shape {tuple(self.scale.shape)}; expected {expected} for "
                             f"shape {tuple(self.shape)} with group_size={self.group_size}")
        if self.fmt == NVFP4:  # zero_point holds the float32 global scale
            if self.zero_point is None or tuple(self.zero_point.shape) != (1,):
                raise ValueError(f"PackedTensor(nvfp4) needs its global scale of shape (1,) as zero_point; got "
                                 f"{getattr(self.zero_point, 'shape', None)}")
        elif self.zero_point is not None and tuple(self.zero_point.shape) != expected:
            raise ValueError(f"PackedTensor.zero_point has shape {tuple(self.zero_point.shape)}; expected {expected}")

    @property
    def bits(self) -> int:
        return format_bits(self.fmt)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """True storage in bytes: packed codes plus scales, zero points and code book."""
        n = self.data.numel() + self.scale.numel() * self.scale.element_size()
        for t in (self.zero_point, self.codebook):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    @property
    def bits_per_value(self) -> float:
        numel = 1
        for s in self.shape:
            numel *= s
        return 8.0 * self.nbytes / numel

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        if self.codebook is not None:
            return ops.dequantize_codebook(self.data, self.scale, self.codebook, group_size=self.group_size,
                                           k=self.shape[-1], dtype=dtype or self.dtype)
        return ops.dequantize(self.data, self.scale, self.zero_point, self.fmt, symmetric=self.symmetric,
                              group_size=self.group_size, k=self.shape[-1], dtype=dtype or self.dtype)

    def to(self, device) -> "PackedTensor":
        """The same packed tensor on ``device``. Packed bytes have no float dtype to cast to: use
        :meth:`dequantize` for float values."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"PackedTensor.to() moves packed bytes between devices and cannot cast them to "
                            f"{device}; use .dequantize({device}) for float values")
        device = torch.device(device)
        zp = None if self.zero_point is None else self.zero_point.to(device)
        cb = None if self.codebook is None else self.codebook.to(device)
        return PackedTensor(self.data.to(device), self.scale.to(device), zp, self.fmt, self.symmetric,
                            self.group_size, self.shape, self.dtype, cb)

    def __repr__(self) -> str:
        asym = "" if self.symmetric or self.fmt.startswith("fp") else ", asymmetric"
        return (f"PackedTensor({self.fmt}{asym}, shape={list(self.shape)}, group_size={self.group_size}, "
                f"{self.nbytes} bytes ({self.bits_per_value:.2f} bits/value), device={self.device})")


def concat_rows(parts: list) -> PackedTensor:
    """One PackedTensor of the rows of ``parts`` (2-D packed tensors of the same format, layout and
    width, quantized a block of rows at a time), in order."""
    first = parts[0]
    if len(parts) == 1:
        return first
    cat = (lambda ts: None if ts[0] is None else torch.cat(ts))  # noqa: E731
    if first.fmt == NVFP4:  # one global scale for the tensor
        if any(not torch.equal(p.zero_point, first.zero_point) for p in parts):
            raise ValueError("concat_rows: nvfp4 parts have different global scales; quantize them under one")
        cat = (lambda ts: ts[0])  # noqa: E731
    rows = sum(p.shape[0] for p in parts)
    return PackedTensor(torch.cat([p.data for p in parts]), torch.cat([p.scale for p in parts]),
                        cat([p.zero_point for p in parts]), first.fmt, first.symmetric, first.group_size,
                        (rows,) + tuple(first.shape[1:]), first.dtype, cat([p.codebook for p in parts]))
