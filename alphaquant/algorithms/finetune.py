"""Fine-tuning of the quantization scales end to end, by distillation from the float model.

After a plan has chosen every layer's codes (round to nearest or GPTQ), each weight is
W = s * U per group, with U fixed by the codes (and zero points): U = (code + qmin - zero) for
integers, the format's value for fp4/fp8/nf4/code books. Only the scales s are trained (as
s0 * exp(theta), so one learning rate fits scales of every magnitude), optionally with the
model's norm weights, to make the quantized model's output distribution match the float
model's on calibration text (KL divergence of the next-token distributions; mean squared error
of the last hidden state for encoders). The codes never change, so the layout, the bits and
every export stay as they were; the layers' own errors are corrected jointly, which
layer-by-layer methods (GPTQ) cannot do. This is the "end-to-end training of quantization
parameters" step of EfficientQAT (Chen et al., 2024) on top of our calibrated codes.

Memory: a float copy of the model (the teacher) and one float U per quantized layer (the size
of the float weights) while it runs; the checkpoint afterwards is as small as before.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import expand_groups
from ..nn.quant_linear import QuantLinear

OPTIONS = {"epochs": 2, "lr": 2e-3, "norms": False, "seed": 0}


@dataclass
class FinetuneOptions:
    epochs: int = OPTIONS["epochs"]  # passes over the calibration batches
    lr: float = OPTIONS["lr"]  # Adam step on log-scales (cosine decay to 0)
    norms: bool = OPTIONS["norms"]  # also train the norm weights (at lr / 10)
    seed: int = OPTIONS["seed"]  # order of the batches


def check_options(raw) -> dict:
    """A plan's "finetune" value ({} or true for the defaults) -> full options; ValueError says
    what is wrong."""
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"'finetune' must be an object with keys {sorted(OPTIONS)} (or true); got {raw!r}")
    unknown = set(raw) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown 'finetune' keys {sorted(map(str, unknown))}; allowed: {sorted(OPTIONS)}")
    out = {**OPTIONS, **raw}
    if not isinstance(out["epochs"], int) or isinstance(out["epochs"], bool) or not 1 <= out["epochs"] <= 100:
        raise ValueError(f"'finetune' epochs must be an integer in [1, 100]; got {out['epochs']!r}")
    lr = out["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr <= 1) or not math.isfinite(lr):
        raise ValueError(f"'finetune' lr must be a number in (0, 1]; got {lr!r}")
    if not isinstance(out["norms"], bool):
        raise ValueError(f"'finetune' norms must be true or false; got {out['norms']!r}")
    if not isinstance(out["seed"], int) or isinstance(out["seed"], bool):
        raise ValueError(f"'finetune' seed must be an integer; got {out['seed']!r}")
    return out


def _distillation_loss(student_out, teacher_out) -> torch.Tensor:
    if hasattr(student_out, "logits") and student_out.logits is not None:
        s = student_out.logits.float().reshape(-1, student_out.logits.shape[-1])
        t = teacher_out.logits.float().reshape(-1, teacher_out.logits.shape[-1])
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    s = getattr(student_out, "last_hidden_state", student_out)
    t = getattr(teacher_out, "last_hidden_state", teacher_out)
    if not isinstance(s, torch.Tensor):
        raise TypeError("finetune needs the model to return logits, a last_hidden_state or a tensor")
    return F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12)


def _tunable_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    scale = self._ft_scale0 * torch.exp(self._ft_theta)
    w = self._ft_unit * expand_groups(scale, self.in_features, self.group_size)
    xq = self.act_quantizer.quantize_activation(x) if self.act_quantizer is not None else x
    return F.linear(xq.to(w.dtype), w, None if self.bias is None else self.bias.to(w.dtype)).to(x.dtype)


def finetune_scales(model: nn.Module, teacher: nn.Module, batches: Iterable,
                    forward_fn: Optional[Callable] = None, options: Optional[FinetuneOptions] = None,
                    progress: Optional[Callable] = None, undo: Optional[list] = None) -> dict:
    """Train the weight scales of ``model``'s QuantLinear layers (and its norms, if asked) so that
    its outputs match ``teacher``'s (the same model in float) on ``batches``; writes the new
    scales (in each layer's scale dtype) into the layers. ``undo`` gets (tensor, old values) of
    every float tensor changed in place. Returns {"loss_first_epoch", "loss_last_epoch"}."""
    options = options or FinetuneOptions()
    forward = forward_fn or (lambda m, b: m(b))
    batches = list(batches)
    if not batches:
        raise ValueError("finetune needs calibration batches; got none")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("finetune: the model has no quantized layers")
    trained = []
    norms = []
    if options.norms:
        norms = [p for n, m in model.named_modules() if "norm" in type(m).__name__.lower()
                 for p in m.parameters(recurse=False) if p.is_floating_point()]
    frozen = [p for p in model.parameters() if p.requires_grad]
    teacher_frozen = [p for p in teacher.parameters() if p.requires_grad]
    stats = {}
    try:
        for p in frozen + teacher_frozen:
            p.requires_grad_(False)
        with torch.no_grad():
            for m in layers:
                s0 = m.weight_scale.detach().float()
                w = m.dequantized_weight(torch.float32)
                m._ft_scale0 = s0
                m._ft_unit = w / expand_groups(s0, m.in_features, m.group_size)
                m._ft_theta = torch.zeros_like(s0, requires_grad=True)
                m.forward = types.MethodType(_tunable_forward, m)
                trained.append(m._ft_theta)
        for p in norms:
            if undo is not None:
                undo.append((p.data, p.detach().clone()))
            p.requires_grad_(True)
        groups = [{"params": trained, "lr": options.lr}]
        if norms:
            groups.append({"params": norms, "lr": options.lr / 10})
        opt = torch.optim.Adam(groups)
        total = options.epochs * len(batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))
        gen = torch.Generator().manual_seed(options.seed)
        teacher.eval()
        steps = [(e, j) for e in range(options.epochs) for j in torch.randperm(len(batches), generator=gen).tolist()]
        losses = [0.0] * options.epochs
        for epoch, j in (progress(steps, desc="fine-tuning scales") if progress else steps):
            with torch.no_grad():
                target = forward(teacher, batches[j])
            loss = _distillation_loss(forward(model, batches[j]), target)
            if not torch.isfinite(loss):
                raise ValueError(f"finetune: the loss became {loss.item()} (lower 'lr'; got {options.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses[epoch] += loss.item() / len(batches)
        stats = {"loss_first_epoch": losses[0], "loss_last_epoch": losses[-1]}
        new_scales = [(m, (m._ft_scale0 * torch.exp(m._ft_theta.detach())).to(m.weight_scale.dtype)) for m in layers]
    finally:
        for m in layers:
            for attr in ("forward", "_ft_scale0", "_ft_unit", "_ft_theta"):
                m.__dict__.pop(attr, None)
        for p in norms:
            p.requires_grad_(False)
        for p in frozen + teacher_frozen:
            p.requires_grad_(True)
    for m, s in new_scales:
        bad = ~((s > 0) & torch.isfinite(s))
        if bad.any():  # a scale that left the dtype's range: keep the one GPTQ/RTN chose
            s = torch.where(bad, m.weight_scale, s)
        with torch.no_grad():
            m.weight_scale.copy_(s)
        m.check_scales()
    return stats
