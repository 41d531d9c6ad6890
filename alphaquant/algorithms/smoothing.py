"""Per-input-channel scaling folded into the layer that feeds a group of linears.

For linears that all read the output of one norm (or one linear), y = (x / s) (W s)^T is the same
function for any positive per-channel s: s is divided out of the producer's weight (and bias)
and multiplied into the consumers' columns. Chosen well, s makes the product easier to quantize:
- activation-aware scaling (as AWQ, Lin et al. 2023): channels with large activations get larger
  weights, hence relatively finer weight steps; s = mean|x|^a / mean|w|^(1-a), a searched on a
  grid to minimize the consumers' output error on calibration inputs with their own quantizers;
- activation smoothing (as SmoothQuant, Xiao et al. 2022): s = max|x|^a / max|w|^(1-a) moves
  activation outliers into the weights so that int8 activations lose less; a searched the
  same way (or fixed by the plan), with the activations quantized in the error measure.
Which module feeds which linears is recognized by name for Llama-family and BERT-family blocks
(MAPPINGS); a producer whose output does not map one to one onto the consumers' inputs (grouped
query attention's v_proj -> o_proj) is left alone, and so is one whose consumers rotate their
input online (down_proj of a rotated model: a per-channel scale does not commute with the rotation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .rotation import ATTR as ROTATION_ATTR

# (producer, consumers) by module name inside one repeated block.
MAPPINGS = [
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("self_attn.v_proj", ["self_attn.o_proj"]),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("mlp.up_proj", ["mlp.down_proj"]),
    ("attention.self.value", ["attention.output.dense"]),
    ("attention.output.LayerNorm", ["intermediate.dense"]),
]
GRID = 20
MAX_TOKENS = 1024  # calibration rows kept per consumer group for the search (its cost grows with them)


@dataclass
class Mapping:
    producer_name: str
    producer: nn.Module
    consumer_names: list
    consumers: list


def block_mappings(block: nn.Module, wanted: Callable[[str], bool]) -> list:
    """The MAPPINGS present in ``block`` whose consumers are all linears that ``wanted(name)``."""
    modules = dict(block.named_modules())
    found = []
    for prod_name, cons_names in MAPPINGS:
        prod = modules.get(prod_name)
        cons = [modules.get(n) for n in cons_names]
        if prod is None or any(not isinstance(c, nn.Linear) for c in cons) or not all(wanted(n) for n in cons_names):
            continue
        if any(getattr(c, ROTATION_ATTR, None) for c in cons):
            continue  # the consumer mixes its input channels (online rotation) before using them
        width = cons[0].in_features
        if any(c.in_features != width for c in cons) or _producer_width(prod) != width:
            continue
        found.append(Mapping(prod_name, prod, cons_names, cons))
    return found


def _producer_width(prod: nn.Module) -> Optional[int]:
    if isinstance(prod, nn.Linear):
        return prod.out_features
    w = getattr(prod, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1 and not _offset_norm(prod):
        return w.shape[0]
    return None


def _offset_norm(prod: nn.Module) -> bool:
    # Norms computing x * (1 + weight) (Gemma) cannot take a division of their weight.
    return "gemma" in type(prod).__name__.lower()


@torch.no_grad()
def fold(mapping: Mapping, s: torch.Tensor) -> None:
    """producer /= s (its output channels), consumers *= s (their input columns)."""
    prod = mapping.producer
    if isinstance(prod, nn.Linear):
        prod.weight.div_(s.to(prod.weight.dtype).unsqueeze(1))
    else:
        prod.weight.div_(s.to(prod.weight.dtype))
    if getattr(prod, "bias", None) is not None:
        prod.bias.div_(s.to(prod.bias.dtype))
    for c in mapping.consumers:
        c.weight.mul_(s.to(c.weight.dtype).unsqueeze(0))


def _output_error(x: torch.Tensor, consumers: list, quantizers: list, s: torch.Tensor, refs: list) -> float:
    err = 0.0
    xs = x / s
    for lin, (wq, aq), ref in zip(consumers, quantizers, refs):
        w = lin.weight.detach().float()
        wq_hat = wq.quantize_weight(w * s).dequantize(torch.float32) if wq is not None else w * s
        xin = aq.quantize_activation(xs).float() if aq is not None else xs
        err += (ref - xin @ wq_hat.T).pow(2).sum().item()
    return err


@torch.no_grad()
def search_scales(x: torch.Tensor, mapping: Mapping, quantizers: list, method: str,
                  alpha: Optional[float] = None) -> tuple:
    """(s, alpha, error, error without scaling) for the mapping's consumers on inputs ``x`` [T, K].

    method "awq" uses mean magnitudes, "smoothquant" maxima; ``alpha`` fixes the exponent,
    otherwise it is searched on a grid of GRID values in [0, 1) (alpha 0 with mean weights
    is the identity for "awq" only up to the normalization, so no scaling is tried as well).
    """
    x = x.float()
    ws = torch.cat([c.weight.detach().float() for c in mapping.consumers], 0)
    if method == "awq":
        xm = x.abs().mean(0)
        wm = (ws.abs() / ws.abs().amax(1, keepdim=True).clamp_min(1e-12)).mean(0)
    elif method == "smoothquant":
        xm = x.abs().amax(0)
        wm = ws.abs().amax(0)
    else:
        raise ValueError(f"unknown scaling method {method!r}; allowed: awq, smoothquant")
    xm, wm = xm.clamp_min(1e-5), wm.clamp_min(1e-5)
    refs = [x @ c.weight.detach().float().T for c in mapping.consumers]  # the float outputs, once
    base = _output_error(x, mapping.consumers, quantizers, torch.ones_like(xm), refs)
    best = (torch.ones_like(xm), 0.0, base)
    alphas = [alpha] if alpha is not None else [i / GRID for i in range(GRID)]
    for a in alphas:
        s = xm.pow(a) / wm.pow(1 - a)
        s = s / (s.max() * s.min()).sqrt()  # centred, so that neither side drifts in magnitude
        if not torch.isfinite(s).all() or (s <= 0).any():
            continue
        e = _output_error(x, mapping.consumers, quantizers, s, refs)
        if e < best[2] or alpha is not None:
            best = (s, a, e)
    return best[0], best[1], best[2], base


def subsample_rows(x: torch.Tensor, n: int = MAX_TOKENS) -> torch.Tensor:
    """At most ``n`` rows of ``x`` [T, K], evenly spaced (deterministic)."""
    if x.shape[0] <= n:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, n).round().long()
    return x[idx]
