"""Observers: collect statistics of tensors during calibration and turn them into static scales.

An observer is configured by the quantizer it is attached to (format, symmetry, granularity,
group size). Statistics are reduced over every row, so scales come out as:
per_tensor [1], per_group [groups] (shared by all rows), per_channel [rows, 1] (rows must not
change between batches: meant for weights).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..formats import format_bits, format_max, int_range, is_int_format
from ..layout import op_group_size, scale_shape, to_groups


def scales_from_range(mn: torch.Tensor, mx: torch.Tensor, fmt: str, symmetric: bool):
    """Scale (and zero point) from a range, with the formulas the kernels apply (quant_math.h)."""
    mn, mx = mn.to(torch.float32), mx.to(torch.float32)
    one = torch.ones((), dtype=torch.float32, device=mn.device)
    if not is_int_format(fmt) or symmetric:
        qmax = format_max(fmt) if not is_int_format(fmt) else int_range(format_bits(fmt), True)[1]
        scale = torch.maximum(mn.abs(), mx.abs()) / qmax
        return torch.where((scale > 0) & torch.isfinite(scale), scale, one), None
    qmin, qmax = int_range(format_bits(fmt), False)
    steps = qmax - qmin
    span = mx - mn
    # A range wider than float32 (values near +-3.4e38) is divided before it is subtracted; with
    # one step (int1) even that overflows, and the largest float32 stands in.
    split = mx / steps - mn / steps
    split = torch.where(torch.isfinite(split), split, torch.tensor(torch.finfo(torch.float32).max, device=mn.device))
    scale = torch.where(torch.isfinite(span), span / steps, split)
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, one)
    return scale, qmin - mn / scale


class ObserverBase:
    """Collects per-group statistics; subclasses choose which (min/max, percentiles, MSE search)."""

    def __init__(self):
        self.fmt = "int8"
        self.symmetric = True
        self.granularity = "per_tensor"
        self.group_size = 128
        self.num_batches = 0

    def configure(self, fmt: str, symmetric: bool, granularity: str, group_size: int) -> None:
        self.fmt, self.symmetric, self.granularity, self.group_size = fmt, symmetric, granularity, group_size
        self.reset()

    def reset(self) -> None:
        self.num_batches = 0

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x -> float32 [rows, k] with NaN/Inf counted as 0 (they carry no range information)."""
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
            raise TypeError(f"{type(self).__name__}.observe expects a floating tensor; got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.numel() == 0:
            raise ValueError("cannot observe an empty tensor")
        x = x.detach().to(torch.float32)
        x = x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)
        return torch.where(torch.isfinite(x), x, torch.zeros((), device=x.device))

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x -> float32 [rows, groups, g] (padded with NaN), the unit every statistic reduces over."""
        x = self._rows(x)
        if self.granularity == "per_tensor":
            return x.reshape(1, 1, -1)
        return to_groups(x, op_group_size(self.granularity, self.group_size))

    def _reduce_dims(self):
        # per_channel keeps rows; the others pool rows together.
        return (2,) if self.granularity == "per_channel" else (0, 2)

    def _shape(self, t: torch.Tensor) -> torch.Tensor:
        if self.granularity == "per_tensor":
            return t.reshape(1)
        if self.granularity == "per_channel":
            return t.reshape(-1, 1)
        return t.reshape(-1)

    def _range(self, x: torch.Tensor):
        g = self._grouped(x)
        dims = self._reduce_dims()
        mn = torch.nan_to_num(g, nan=float("inf")).amin(dim=dims)
        mx = torch.nan_to_num(g, nan=float("-inf")).amax(dim=dims)
        return self._shape(mn), self._shape(mx)

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def min_max(self):
        raise NotImplementedError

    def compute_scales(self):
        """(scale, zero_point or None) from what was observed."""
        if self.num_batches == 0:
            raise RuntimeError(f"{type(self).__name__}: nothing was observed; call observe() on calibration data first")
        mn, mx = self.min_max()
        return scales_from_range(mn, mx, self.fmt, self.symmetric)

    def _check_same(self, old: torch.Tensor, new: torch.Tensor) -> None:
        if old.shape != new.shape:
            raise ValueError(f"{type(self).__name__}: statistics of shape {tuple(new.shape)} do not match earlier "
                             f"batches {tuple(old.shape)}; per_group needs the same last dimension and per_channel "
                             f"the same number of rows in every batch")


class MinMaxObserver(ObserverBase):
    """Running min and max over every batch."""

    def reset(self) -> None:
        super().reset()
        self.min_val: Optional[torch.Tensor] = None
        self.max_val: Optional[torch.Tensor] = None

    def observe(self, x: torch.Tensor) -> None:
        mn, mx = self._range(x)
        if self.min_val is None:
            self.min_val, self.max_val = mn, mx
        else:
            self._check_same(self.min_val, mn)
            self.min_val, self.max_val = self._combine(mn, mx)
        self.num_batches += 1

    def _combine(self, mn: torch.Tensor, mx: torch.Tensor):
        """New (min, max) from the running ones and this batch's; subclasses average instead."""
        return torch.minimum(self.min_val, mn), torch.maximum(self.max_val, mx)

    def min_max(self):
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max (robust to one outlier batch)."""

    def __init__(self, momentum: float = 0.1):
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1]; got {momentum}")
        super().__init__()
        self.momentum = momentum

    def _combine(self, mn: torch.Tensor, mx: torch.Tensor):
        m = self.momentum
        return (1 - m) * self.min_val + m * mn, (1 - m) * self.max_val + m * mx


class PercentileObserver(MinMaxObserver):
    """Average over batches of the lower and upper ``percentile`` of each group (clips outliers)."""

    def __init__(self, percentile: float = 99.99, max_samples: int = 1 << 20):
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100]; got {percentile}")
        super().__init__()
        self.percentile = percentile
        self.max_samples = max_samples

    def _range(self, x: torch.Tensor):
        g = self._grouped(x)
        # [units, values]: one row of samples per statistic.
        if self.granularity == "per_channel":
            vals = g.reshape(g.shape[0], -1)
        else:
            vals = g.permute(1, 0, 2).reshape(g.shape[1], -1)
        if vals.shape[1] > self.max_samples:
            idx = torch.randperm(vals.shape[1], device=vals.device)[: self.max_samples]
            vals = vals[:, idx]
        q = self.percentile / 100.0
        mx = torch.nanquantile(vals, q, dim=1)
        mn = torch.nanquantile(vals, 1 - q, dim=1)
        return self._shape(mn), self._shape(mx)

    def _combine(self, mn: torch.Tensor, mx: torch.Tensor):
        n = self.num_batches
        return (self.min_val * n + mn) / (n + 1), (self.max_val * n + mx) / (n + 1)


class MSEObserver(MinMaxObserver):
    """Searches, per group, the clipping of the min/max range that minimizes the squared error of
    quantizing the observed data to the target format (integer or float).

    grid: number of clipping ratios tried between ``min_ratio`` and 1; max_rows: rows of observed
    data kept for the search (the min/max still covers every batch).
    """

    def __init__(self, grid: int = 40, min_ratio: float = 0.3, max_rows: int = 4096):
        if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
            raise ValueError(f"grid must be an int >= 1; got {grid!r}")
        if not isinstance(min_ratio, (int, float)) or isinstance(min_ratio, bool) or not 0.0 < min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in (0, 1]; got {min_ratio!r}")
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1; got {max_rows!r}")
        super().__init__()
        self.grid, self.min_ratio, self.max_rows = grid, float(min_ratio), max_rows

    def reset(self) -> None:
        super().reset()
        self.samples: list[torch.Tensor] = []
        self._kept_rows = 0

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        rows = self._rows(x)
        if self.granularity == "per_tensor":
            rows = rows.reshape(1, -1)  # batches of any shape: one group each
        if self._kept_rows < self.max_rows and (self.granularity != "per_channel" or not self.samples):
            kept = rows[: self.max_rows - self._kept_rows].clone()
            self.samples.append(kept)
            self._kept_rows += kept.shape[0]

    def compute_scales(self):
        if self.num_batches == 0:
            raise RuntimeError("MSEObserver: nothing was observed; call observe() on calibration data first")
        best_err, best_ratio = None, None
        for i in range(self.grid + 1):
            ratio = self.min_ratio + (1 - self.min_ratio) * i / self.grid
            scale, zero = scales_from_range(self.min_val * ratio, self.max_val * ratio, self.fmt, self.symmetric)
            err = sum(self._quantization_error(d, scale, zero) for d in self.samples)
            if best_err is None:
                best_err, best_ratio = err, torch.full_like(err, ratio)
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_ratio = torch.where(better, torch.full_like(err, ratio), best_ratio)
        return scales_from_range(self.min_val * best_ratio, self.max_val * best_ratio, self.fmt, self.symmetric)

    def _quantization_error(self, data: torch.Tensor, scale: torch.Tensor, zero) -> torch.Tensor:
        """Squared error of fake-quantizing ``data`` [rows, k] with these scales, per statistic."""
        group_size = -1 if self.granularity == "per_tensor" else op_group_size(self.granularity, self.group_size)
        target = scale_shape(data.shape, group_size)
        s = scale.expand(target).contiguous()
        z = None if zero is None else zero.expand(target).contiguous()
        fq = ops.fake_quantize(data, self.fmt, symmetric=self.symmetric, group_size=group_size, scale=s, zero_point=z)
        return self._group_error((data - fq) ** 2)

    def _group_error(self, sq: torch.Tensor) -> torch.Tensor:
        g = self._grouped(sq)
        return self._shape(torch.nansum(g, dim=self._reduce_dims()))
