"""Mixed precision under a size budget: which format each linear layer gets.

Sensitivity: the loss change of quantizing one layer with one candidate is predicted from the
diagonal of the empirical Fisher information (squared loss gradients on calibration data),
dL ~ 1/2 sum_ij F_ij (W_ij - Q(W)_ij)^2, for every layer and candidate, from one backward pass
per calibration batch. The per-layer predictions are summed (layers treated as independent, the
usual second-order approximation) and the assignment that minimizes the predicted loss at a
given average of bits per weight, scales included, is found as a multiple-choice knapsack
(dynamic programming over the budget). The result never exceeds the budget.
"""
from __future__ import annotations

import glob
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .. import ops

# Candidates of the planner by default: int2..int8, asymmetric, fp16 scales (so their cost in
# bits is bits + 32 / group size), zero points refined (zero_opt).
_BASE = {"aq": "none", "symmetric": False, "scale_dtype": "float16", "zero_opt": True}
DEFAULT_CANDIDATES = {
    "int2_g128": {**_BASE, "wq": "int2", "group_size": 128},
    "int2_g64": {**_BASE, "wq": "int2", "group_size": 64},
    "int2_g32": {**_BASE, "wq": "int2", "group_size": 32},
    "int3_g128": {**_BASE, "wq": "int3", "group_size": 128},
    "int3_g64": {**_BASE, "wq": "int3", "group_size": 64},
    "int3_g32": {**_BASE, "wq": "int3", "group_size": 32},
    "int4_g128": {**_BASE, "wq": "int4", "group_size": 128},
    "int4_g64": {**_BASE, "wq": "int4", "group_size": 64},
    "int4_g32": {**_BASE, "wq": "int4", "group_size": 32},
    "int5_g64": {**_BASE, "wq": "int5", "group_size": 64},
    "int6_g64": {**_BASE, "wq": "int6", "group_size": 64},
    "int8_g64": {**_BASE, "wq": "int8", "group_size": 64},
}


def layer_bytes(rows: int, k: int, scheme: dict) -> int:
    """Stored bytes of a [rows, k] weight under ``scheme`` (codes, scales and zero points)."""
    from ..plans import DEFAULTS, build_quantizers

    wq, _ = build_quantizers({**DEFAULTS, **scheme})
    packed, scale, zero = ops._quantize_fake_shapes(rows, k, wq.fmt, wq.symmetric, wq.config.op_group_size)
    sbytes = torch.finfo(getattr(torch, wq.config.scale_dtype)).bits // 8
    n = packed[0] * packed[1] + math.prod(scale) * sbytes
    return n + (math.prod(zero) * sbytes if zero is not None else 0)


@torch.no_grad()
def _rtn_error(weight: torch.Tensor, fisher: torch.Tensor, scheme: dict) -> float:
    from ..plans import DEFAULTS, build_quantizers

    wq, _ = build_quantizers({**DEFAULTS, **scheme})
    deq = wq.quantize_weight(weight).dequantize(torch.float32)
    return 0.5 * float((fisher * (weight.float() - deq).pow(2)).sum())


def fisher_diagonals(model: nn.Module, names: list, batches: Iterable, loss_fn: Callable) -> dict:
    """{name: mean squared gradient of the loss w.r.t. the layer's weight} over ``batches``."""
    params = {n: model.get_submodule(n).weight for n in names}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for n, p in params.items():
                fisher[n].add_(p.grad.float().pow(2))
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    if count == 0:
        raise ValueError("sensitivity needs at least one calibration batch")
    return {n: f / count for n, f in fisher.items()}


@dataclass
class Sensitivity:
    """Predicted loss increase ``cost[layer][candidate]`` and stored bytes ``size[layer][candidate]``."""

    layers: list
    numel: dict
    candidates: dict
    cost: dict = field(default_factory=dict)
    size: dict = field(default_factory=dict)

    @property
    def total_weights(self) -> int:
        return sum(self.numel.values())

    def bits(self, assignment: dict) -> float:
        return 8.0 * sum(self.size[n][assignment[n]] for n in self.layers) / self.total_weights

    def predicted_loss(self, assignment: dict) -> float:
        return sum(self.cost[n][assignment[n]] for n in self.layers)


def measure_sensitivity(model: nn.Module, names: list, batches: list, loss_fn: Callable,
                        candidates: Optional[dict] = None, progress=None) -> Sensitivity:
    candidates = dict(candidates or DEFAULT_CANDIDATES)
    fisher = fisher_diagonals(model, names, batches, loss_fn)
    sens = Sensitivity(list(names), {}, candidates)
    for n in (progress(names, desc="sensitivity") if progress else names):
        w = model.get_submodule(n).weight.detach()
        sens.numel[n] = w.numel()
        sens.cost[n] = {c: _rtn_error(w, fisher[n], s) for c, s in candidates.items()}
        sens.size[n] = {c: layer_bytes(w.shape[0], w.shape[1], s) for c, s in candidates.items()}
    return sens


def solve_budget(sens: Sensitivity, budget_bits: float, resolution: int = 20000) -> dict:
    """{layer: candidate} minimizing the predicted loss with average bits per weight <= budget.

    Dynamic programming over the budget cut into ``resolution`` units, each layer's size rounded
    up to whole units (so a mix that fits in units fits in bytes), then a greedy pass spends the
    bytes the rounding left over.
    """
    import numpy as np

    limit = budget_bits * sens.total_weights / 8.0  # bytes
    cands = list(sens.candidates)
    floor = sum(min(sens.size[n].values()) for n in sens.layers)
    if floor > limit:
        raise ValueError(f"a budget of {budget_bits} bits per weight is below the smallest candidate mix "
                         f"({8.0 * floor / sens.total_weights:.3f} bits per weight)")
    unit = limit / resolution
    units = {n: [math.ceil(sens.size[n][c] / unit - 1e-9) for c in cands] for n in sens.layers}
    best = np.zeros(resolution + 1)  # best[b]: least cost of the layers so far within b units
    choices = []
    for n in sens.layers:
        new = np.full(resolution + 1, np.inf)
        arg = np.zeros(resolution + 1, dtype=np.int16)
        for j, c in enumerate(cands):
            u = units[n][j]
            if u > resolution:
                continue
            cand = np.full(resolution + 1, np.inf)
            cand[u:] = best[:resolution + 1 - u] + sens.cost[n][c]
            better = cand < new
            new[better], arg[better] = cand[better], j
        best = new
        choices.append(arg)
    if not np.isfinite(best[resolution]):
        # rounding up made the tightest mixes too big in units: fall back to the cheapest one
        assignment = {n: min(sens.size[n], key=sens.size[n].get) for n in sens.layers}
    else:
        assignment, b = {}, resolution
        for n, arg in zip(reversed(sens.layers), reversed(choices)):
            j = int(arg[b])
            assignment[n] = cands[j]
            b -= units[n][j]
        assignment = {n: assignment[n] for n in sens.layers}
    # Greedy: spend the bytes left on the upgrades that buy the most loss per byte.
    spare = limit - sum(sens.size[n][assignment[n]] for n in sens.layers)
    while True:
        move = None
        for n in sens.layers:
            cur = assignment[n]
            for c in cands:
                extra = sens.size[n][c] - sens.size[n][cur]
                gain = sens.cost[n][cur] - sens.cost[n][c]
                if gain > 0 and extra <= spare and (move is None or gain / max(extra, 1e-9) > move[0]):
                    move = (gain / max(extra, 1e-9), n, c, extra)
        if move is None:
            break
        _, n, c, extra = move
        assignment[n] = c
        spare -= extra
    assert sum(sens.size[n][assignment[n]] for n in sens.layers) <= limit
    return assignment


def assignment_plan(assignment: dict, candidates: dict, name: str, extra: Optional[dict] = None) -> dict:
    """A plan with one override per layer (exact names, glob characters escaped)."""
    extra = extra or {}
    overrides = [{"pattern": glob.escape(n), **candidates[c], **extra} for n, c in assignment.items()]
    return {"name": name, "default": {"wq": "none"}, "overrides": overrides}
