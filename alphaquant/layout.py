"""Group layout: how a tensor [..., k] is cut into groups that share one scale (and zero point).

The one home of these rules in Python; the kernels' copy is csrc/include/alphaquant/layout.h and
the independent oracle (alphaquant/reference.py) keeps its own on purpose.

Granularities, as configs name them, and the ops' integer encoding (``group_size`` argument):
  per_group    groups of ``group_size`` values along the last dimension (the last group of a row
               may be shorter)                                                    -> group_size > 0
  per_channel  one group per row (an output channel of a weight, a token of an activation) -> 0
  per_tensor   one group for the whole tensor                                                -> -1
Scales have shape ``x.shape[:-1] + (groups,)``, or all ones per tensor.
"""
from __future__ import annotations

import torch

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
PER_TENSOR = -1
PER_CHANNEL = 0


def op_group_size(granularity: str, group_size: int) -> int:
    """The ops' encoding of a granularity: -1 per tensor, 0 per channel, else the group size."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
    return {"per_tensor": PER_TENSOR, "per_channel": PER_CHANNEL}.get(granularity, group_size)


def check_op_group_size(group_size: int) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < -1:
        raise ValueError(f"group_size must be > 0 (groups along the last dimension), 0 (per-channel) or -1 "
                         f"(per-tensor); got {group_size!r}")
    return group_size


def group_length(k: int, group_size: int) -> int:
    """Values per group along a row of ``k`` (the last group may hold fewer)."""
    return k if group_size <= 0 or group_size >= k else group_size


def num_groups(k: int, group_size: int) -> int:
    """Groups per row of ``k`` values (1 per channel and per tensor)."""
    g = group_length(k, group_size)
    return (k + g - 1) // g if g > 0 else 1


def scale_shape(shape, group_size: int) -> tuple:
    """Shape of the scale (and zero point) tensor for an input of ``shape``."""
    shape = tuple(shape)
    if group_size == PER_TENSOR:
        return (1,) * len(shape)
    return shape[:-1] + (num_groups(shape[-1], group_size),)


def to_groups(t: torch.Tensor, group_size: int, pad_value: float = float("nan")) -> torch.Tensor:
    """[..., k] -> [..., groups, g], the short last group padded with ``pad_value``.

    Per tensor, the whole tensor is one group: [1, ..., 1, numel] (a view where possible).
    """
    if group_size == PER_TENSOR:
        return t.reshape((1,) * (t.dim() - 1) + (1, t.numel()))
    k = t.shape[-1]
    g = group_length(k, group_size)
    groups = num_groups(k, group_size)
    if groups * g != k:
        t = torch.nn.functional.pad(t, (0, groups * g - k), value=pad_value)
    return t.reshape(*t.shape[:-1], groups, g)


def group_sums(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum of ``t`` [..., k] over each group, shaped like the scales."""
    return to_groups(t, group_size, 0.0).sum(-1).reshape(scale_shape(t.shape, group_size))


def expand_groups(s: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Scales (or zero points) [..., groups] -> one value per element [..., k] (differentiable;
    per channel and per tensor they broadcast)."""
    g = group_length(k, group_size)
    if group_size <= 0 or s.shape[-1] == 1:
        return s.expand(*s.shape[:-1], k)
    return s.repeat_interleave(g, dim=-1)[..., :k]
