"""Zero-point optimization for asymmetric integer weights (the half-quadratic method of HQQ,
Badri & Shaji 2023, written here for our (q - z) * s convention).

With the min/max scale fixed, the zero point z of each group is refined to minimize an l_p
error with p < 1, which tolerates a few large errors (outliers) in exchange for many small
ones. Alternating steps: quantize; shrink the residual with the generalized soft threshold of
the l_p norm; set z to the group mean that fits what is left.
"""
from __future__ import annotations

import torch

from .. import ops
from ..formats import format_bits, int_range
from ..layout import to_groups


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    a = x.abs().clamp_min(1e-12)
    return torch.sign(x) * torch.relu(a - torch.exp((p - 1) * torch.log(a)) / beta)


def optimize_zero_points(w: torch.Tensor, fmt: str, group_size: int, iters: int = 20, p: float = 0.7,
                         beta: float = 10.0, kappa: float = 1.01):
    """(scale, zero_point) for asymmetric ``fmt`` (an int format) after l_p zero-point refinement."""
    if group_size == -1:
        raise ValueError("zero-point optimization works per group or per channel, not per tensor")
    _, scale, zero = ops.quantize(w, fmt, symmetric=False, group_size=group_size)
    w2 = w.reshape(-1, w.shape[-1])
    s2, z2 = scale.reshape(w2.shape[0], -1), zero.reshape(w2.shape[0], -1)
    # Row blocks small enough to stay in cache across the iterations.
    rows = max(1, (1 << 17) // max(1, w2.shape[-1]))
    zs = [_refine(w2[r:r + rows], s2[r:r + rows], z2[r:r + rows], fmt, group_size, iters, p, beta, kappa)
          for r in range(0, w2.shape[0], rows)]
    return scale.contiguous(), torch.cat(zs).reshape(zero.shape).contiguous()


def _refine(w, scale, zero, fmt, group_size, iters, p, beta, kappa):
    qmin, qmax = int_range(format_bits(fmt), False)
    wg = to_groups(w.to(torch.float32), group_size)  # [..., groups, g], NaN padding
    valid = ~torch.isnan(wg)
    wg = torch.nan_to_num(wg)
    s = scale.unsqueeze(-1)
    z = zero.unsqueeze(-1)
    best_z, best_err = z, float("inf")
    for _ in range(iters):
        q = torch.round(wg / s + z).clamp_(qmin, qmax)
        resid = wg - (q - z) * s
        err = torch.where(valid, resid.abs(), 0).mean().item()
        if err >= best_err:  # stop once the error stops falling, as HQQ does
            break
        best_z, best_err = z, err
        we = _shrink_lp(resid, beta, p)
        target = torch.where(valid, q - (wg - we) / s, 0)
        z = target.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp_min(1)
        beta *= kappa
    return best_z.squeeze(-1)
