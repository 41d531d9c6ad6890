"""Weight clipping by error search: per group, shrink the min/max range by the ratio (from a
grid) that minimizes the squared quantization error. Outliers then cost less than the many
values they would otherwise coarsen. Works for every format; runs on the native ops."""
from __future__ import annotations

import torch

from .. import ops
from ..formats import format_bits, format_max, int_range, is_int_format
from ..layout import group_sums
from .observers import scales_from_range


def mse_clip_scales(w: torch.Tensor, fmt: str, symmetric: bool, group_size: int, grid: int = 20,
                    min_ratio: float = 0.5):
    """(scale, zero_point or None) per group of ``w`` minimizing ||w - fake_quantize(w)||^2."""
    _, scale, zero = ops.quantize(w, fmt, symmetric=symmetric, group_size=group_size)
    asym = is_int_format(fmt) and not symmetric
    if asym:
        qmin, qmax = int_range(format_bits(fmt), False)
        mn = (qmin - zero) * scale
        mx = mn + scale * (qmax - qmin)
    else:
        qmax = format_max(fmt) if not is_int_format(fmt) else int_range(format_bits(fmt), True)[1]
        mx = scale * qmax
        mn = -mx
    wf = w.to(torch.float32)
    best_err = best_s = best_z = None
    for i in range(grid + 1):
        ratio = min_ratio + (1.0 - min_ratio) * i / grid
        s, z = scales_from_range(mn * ratio, mx * ratio, fmt, symmetric)
        fq = ops.fake_quantize(w, fmt, symmetric=symmetric, group_size=group_size, scale=s.contiguous(),
                               zero_point=None if z is None else z.contiguous())
        err = group_sums((wf - fq.to(torch.float32)) ** 2, group_size)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            if z is not None:
                best_z = torch.where(better, z, best_z)
    return best_s.contiguous(), None if best_z is None else best_z.contiguous()
