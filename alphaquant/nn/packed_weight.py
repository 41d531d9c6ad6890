"""The packed weight that QuantLinear and QuantEmbedding hold: its buffers and their checks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..formats import LEARNED_CODEBOOK_SIZE, LEARNED_FORMATS, NVFP4, decode_zero_points, format_bits
from ..packed import PackedTensor


class PackedWeightModule(nn.Module):
    """Base of the modules whose weight [rows, k] lives packed in low-bit bytes.

    Buffers: ``weight_packed`` uint8 [rows, ceil(k*bits/8)], ``weight_scale`` (float32, or
    float16/bfloat16 by the quantizer's scale_dtype), ``weight_zero_point`` (asymmetric ints
    only; in the scales' dtype, or uint8 for one-byte zero points) and ``weight_codebook`` (learned code books (lut4) only: [16] or [rows, 16]). The
    scales are checked once, when they are loaded, not at every forward.
    """

    def _init_packed_weight(self, rows: int, k: int, fmt: str, symmetric: bool, group_size: int, device,
                            scale_dtype: torch.dtype, codebook_shape, codebook_dtype: torch.dtype,
                            zero_dtype: Optional[torch.dtype] = None) -> None:
        self._weight_rows, self._weight_k = rows, k
        self.fmt, self.symmetric, self.group_size = fmt, symmetric, group_size
        packed, scale, zero = ops._quantize_fake_shapes(rows, k, fmt, symmetric, group_size)
        self.register_buffer("weight_packed", torch.zeros(packed, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(scale, dtype=scale_dtype, device=device))
        self.register_buffer("weight_zero_point",
                             torch.zeros(zero, dtype=zero_dtype or scale_dtype, device=device) if zero else None)
        self.register_buffer("weight_codebook", None)
        if fmt in LEARNED_FORMATS:
            self.allocate_codebook(codebook_shape or (LEARNED_CODEBOOK_SIZE,), codebook_dtype)
        self.register_load_state_dict_post_hook(_check_loaded_scales)

    def _describe(self) -> str:  # how messages name the module
        return f"{type(self).__name__}({self._weight_rows} x {self._weight_k})"

    def load_packed(self, packed: PackedTensor) -> None:
        self.weight_packed.copy_(packed.data)
        self.weight_scale.copy_(packed.scale)
        if packed.zero_point is not None:
            if (packed.zero_point.dtype == torch.uint8) != (self.weight_zero_point.dtype == torch.uint8):
                raise ValueError(f"{self._describe()}: zero points of dtype {packed.zero_point.dtype} do not fit a "
                                 f"{self.weight_zero_point.dtype} buffer (uint8 holds one-byte zero point codes, "
                                 f"which only uint8 holds)")
            self.weight_zero_point.copy_(packed.zero_point)
        if packed.codebook is not None:
            self.weight_codebook.copy_(packed.codebook)
        self.check_scales()

    def allocate_codebook(self, shape: tuple, dtype: torch.dtype) -> None:
        """(Re)allocate the ``weight_codebook`` buffer of a learned code book weight: [16] (one for
        the weight) or [rows, 16] (one per row), float16 or float32; e.g. to load a checkpoint
        whose code book layout differs from the default."""
        if self.fmt not in LEARNED_FORMATS:
            raise ValueError(f"{self._describe()}: {self.fmt} has no learned code book")
        shape = tuple(shape)
        if shape not in ((LEARNED_CODEBOOK_SIZE,), (self._weight_rows, LEARNED_CODEBOOK_SIZE)):
            raise ValueError(f"{self._describe()}: codebook shape must be [{LEARNED_CODEBOOK_SIZE}] or "
                             f"[{self._weight_rows}, {LEARNED_CODEBOOK_SIZE}]; got {list(shape)}")
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"{self._describe()}: codebook dtype must be float16 or float32; got {dtype}")
        self.weight_codebook = torch.zeros(shape, dtype=dtype, device=self.weight_packed.device)

    def check_scales(self) -> None:
        """Raise ValueError unless every weight scale is finite and > 0 and every zero point finite.

        forward() relies on this having been done: it asks the kernel not to check again.
        """
        scale, zero, codebook = self.weight_scale, self.weight_zero_point, self.weight_codebook
        if scale.device.type == "meta" or isinstance(scale, torch._subclasses.FakeTensor):
            return  # no values to check
        if self.fmt == NVFP4:  # the block scales the kernels use: E4M3 byte / global scale
            block = scale.view(torch.float8_e4m3fn).float() / zero.float()
            bad_scale = not bool(((block > 0) & torch.isfinite(block)).all())
        elif scale.dtype == torch.uint8:  # MX E8M0 bytes: every code but 255 (NaN) is a power of two > 0
            bad_scale = bool((scale == 255).any())
        else:
            bad_scale = not bool(((scale > 0) & torch.isfinite(scale)).all())
        bad_zero = zero is not None and not bool(torch.isfinite(zero).all())
        bad_codebook = codebook is not None and not bool(torch.isfinite(codebook).all())
        if bad_scale or bad_zero or bad_codebook:
            got = ("a bad scale" if bad_scale else "a non-finite zero point" if bad_zero
                   else "a non-finite code book value")
            raise ValueError(f"{self._describe()}: weight scales must be finite and > 0 everywhere (and zero points "
                             f"and code book values finite); got {got}")

    def _apply(self, fn, recurse=True):
        # A new scale dtype (module.half(), .to(torch.bfloat16)) can round tiny scales to zero:
        # check again. Same-dtype moves (including to_empty) keep the checked values or have none.
        dtype = self.weight_scale.dtype
        out = super()._apply(fn, recurse)
        if self.weight_scale.dtype != dtype:
            self.check_scales()
        return out

    def float_zero_points(self) -> Optional[torch.Tensor]:
        """The zero points as float32 values (one-byte codes decoded), None when there are none."""
        zp = self.weight_zero_point
        if zp is None or self.fmt == NVFP4:  # nvfp4's is its global scale
            return None
        return decode_zero_points(zp, format_bits(self.fmt)) if zp.dtype == torch.uint8 else zp.float()

    @property
    def packed_weight(self) -> PackedTensor:
        return PackedTensor(self.weight_packed, self.weight_scale, self.weight_zero_point, self.fmt, self.symmetric,
                            self.group_size, (self._weight_rows, self._weight_k), codebook=self.weight_codebook)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed_weight.dequantize(dtype)


def _zero_dtype(packed: PackedTensor) -> Optional[torch.dtype]:
    """The zero point buffer dtype for ``packed``: uint8 for one-byte zero points, float32 for
    nvfp4's global scale, else None (the scales' dtype)."""
    if packed.fmt == NVFP4:
        return torch.float32  # the global scale
    zp = packed.zero_point
    return torch.uint8 if zp is not None and zp.dtype == torch.uint8 else None


def _check_loaded_scales(module: PackedWeightModule, incompatible_keys) -> None:
    module.check_scales()
