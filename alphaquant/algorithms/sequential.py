"""Calibrated quantization one block at a time (the sequential pipeline).

Models made of repeated blocks (decoder layers, encoder layers) are quantized block by block:
the calibration inputs of block i are the outputs of blocks 0..i-1 *as quantized*, so every
block is calibrated on what it will really see, and only one block's activations are held at a
time. Inside a block: per-channel scaling (AWQ / SmoothQuant, alphaquant.algorithms.smoothing)
is searched and folded first, then each linear's input Hessian is collected in one pass and the
linears are quantized (GPTQ or round-to-nearest). Linears outside the blocks (an LM head, a
pooler) are calibrated last, with the whole quantized model in front of them.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .._logging import logger
from .activation_store import SpilledInputs, activation_limit, hidden_bytes, spill
from .gptq import HessianAccumulator
from . import smoothing

# Keyword arguments that carry a KV cache: a calibration pass must not fill one.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _StopForward(Exception):
    pass


def uses_hessian(scheme: dict) -> bool:
    return scheme.get("algorithm", "rtn") == "gptq"


def uses_scaling(scheme: dict) -> Optional[str]:
    if scheme.get("awq"):
        return "awq"
    if scheme.get("smoothquant"):
        return "smoothquant"
    return None


def needs_calibration(scheme: dict) -> bool:
    return uses_hessian(scheme) or uses_scaling(scheme) is not None


def find_blocks(model: nn.Module, names: Iterable[str]) -> tuple[Optional[str], Optional[nn.ModuleList]]:
    """(name, list) of the model's repeated blocks: the longest nn.ModuleList whose children
    hold layers of ``names``; (None, None) when there is none."""
    names = list(names)
    best = (None, None)
    for list_name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        prefix = f"{list_name}." if list_name else ""
        hits = sum(any(n.startswith(f"{prefix}{i}.") for n in names) for i in range(len(mod)))
        if hits >= 2 and (best[1] is None or len(mod) > len(best[1])):
            best = (list_name, mod)
    return best


def _clean_kwargs(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for key in _CACHE_KWARGS:
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, batches, forward_fn) -> list:
    """[(args, kwargs)] that ``block`` receives for every calibration batch (the model is run
    only up to it)."""
    captured = []

    def hook(mod, args, kwargs):
        captured.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), _clean_kwargs(kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                forward_fn(model, batch)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("calibration reached none of the model's blocks (empty calibration_batches?)")
    return captured


MERGE_ROWS = 2048  # tokens per merged calibration batch


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and (a.data_ptr() == b.data_ptr() or torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or (type(a) is type(b) and a == b) if not isinstance(a, nn.Module) else a is b


def merge_inputs(inputs: list, rows: int = MERGE_ROWS) -> list:
    """Calibration inputs stacked along the batch dimension, ``rows`` tokens at a time, where
    that means the same thing: a single positional tensor [1, T, ...] per batch and keyword
    arguments that are the same for all (equal-length windows without padding: position
    embeddings broadcast over the batch, no attention mask). Bigger matrix products, fewer
    calls; anything else is left as it is."""
    if len(inputs) < 2:
        return inputs
    (args0, kw0) = inputs[0]
    shape = args0[0].shape if args0 and isinstance(args0[0], torch.Tensor) else None
    ok = shape is not None and len(shape) >= 2 and shape[0] == 1 and all(
        len(a) == 1 and isinstance(a[0], torch.Tensor) and a[0].shape == shape and kw.keys() == kw0.keys()
        and all(_same(kw[k], kw0[k]) for k in kw0) for a, kw in inputs)
    if not ok or any(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] != 1 for v in kw0.values()):
        return inputs
    per = max(1, rows // shape[1])
    return [((torch.cat([a[0] for a, _ in inputs[i:i + per]]),), kw0) for i in range(0, len(inputs), per)]


@torch.no_grad()
def run_block(block: nn.Module, inputs, info: Optional[dict] = None):
    """The block's outputs as the next block's inputs (same keyword arguments); ``info["tuple"]``
    says whether the block returns a tuple. Inputs on disk (SpilledInputs) give outputs on disk,
    written batch by batch."""
    out = SpilledInputs(os.path.dirname(inputs.folder)) if isinstance(inputs, SpilledInputs) else []
    try:
        for args, kwargs in inputs:
            y = block(*args, **kwargs)
            if info is not None:
                info["tuple"] = isinstance(y, (tuple, list))
            h = y[0] if isinstance(y, (tuple, list)) else y
            out.append(((h,) + tuple(args[1:]), kwargs))
    except BaseException:
        if isinstance(out, SpilledInputs):
            out.close()
        raise
    return out


class _Replay(nn.Module):
    """Stands in for a model's first block: returns the stored outputs of its last block, one
    calibration batch after another (the others pass their input through)."""

    def __init__(self, outputs: Optional[list], as_tuple: bool):
        super().__init__()
        self.outputs, self.as_tuple, self.next = outputs, as_tuple, 0

    def forward(self, hidden, *args, **kwargs):
        if self.outputs is not None:
            hidden = self.outputs[self.next]
            self.next += 1
        return (hidden,) if self.as_tuple else hidden


@contextlib.contextmanager
def _replaying(blocks: nn.ModuleList, final_inputs: list, n_batches: int, as_tuple: bool):
    outputs = [args[0] for (args, _) in final_inputs]
    if len(outputs) != n_batches:
        outputs = [t for o in outputs for t in o.split(1)]  # undo merge_inputs
    saved = list(blocks)
    try:
        for i in range(len(blocks)):
            blocks[i] = _Replay(outputs if i == 0 else None, as_tuple)
        yield
    finally:
        for i, b in enumerate(saved):
            blocks[i] = b


@torch.no_grad()
def _collect(block: nn.Module, inputs: list, targets: dict, rows_per_batch: int = 0) -> tuple[dict, dict]:
    """Run ``block`` over ``inputs`` with hooks on ``targets`` {name: module}: returns
    ({name: HessianAccumulator}, {name: [T, K] sampled inputs} when rows_per_batch > 0)."""
    hess = {n: HessianAccumulator(m.in_features, m.weight.device) for n, m in targets.items()}
    samples = {n: [] for n in targets}
    # Linears fed the very same tensor (q/k/v, gate/up) share one Hessian: decided on the first
    # batch, when a layer's input is found to be one that another target already took.
    owner, seen = {}, {}
    handles = []
    for n, m in targets.items():
        def hook(mod, args, n=n):
            x = args[0].detach()
            if n not in owner:
                key = (x.data_ptr(), tuple(x.shape), x.stride())
                owner[n] = seen.setdefault(key, (n, x))[0]  # x held: its address stays its own
            if owner[n] != n:
                return
            x = x.reshape(-1, x.shape[-1])
            hess[n].add(x)
            if rows_per_batch:
                samples[n].append(smoothing.subsample_rows(x, rows_per_batch).float())
        handles.append(m.register_forward_pre_hook(hook))
    try:
        for args, kwargs in inputs:
            seen.clear()
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    hess = {n: hess[owner.get(n, n)] for n in targets}
    return hess, {n: torch.cat(samples[owner.get(n, n)]) for n in targets if samples[owner.get(n, n)]}


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _scale_block(block: nn.Module, prefix: str, schemes: dict, inputs: list, build_quantizers: Callable,
                 undo: list) -> None:
    wanted = lambda n: n in schemes and uses_scaling(schemes[n]) is not None  # noqa: E731
    mappings = smoothing.block_mappings(block, wanted)
    if not mappings:
        return
    rows = max(1, smoothing.MAX_TOKENS // max(1, len(inputs)))
    _, samples = _collect(block, inputs, {m.consumer_names[0]: m.consumers[0] for m in mappings}, rows)
    for m in mappings:
        scheme = schemes[m.consumer_names[0]]
        method = uses_scaling(scheme)
        quantizers = [build_quantizers(schemes[n]) for n in m.consumer_names]
        s, alpha, err, base = smoothing.search_scales(samples[m.consumer_names[0]], m, quantizers, method,
                                                      scheme.get("smooth_alpha"))
        for t in [m.producer.weight, getattr(m.producer, "bias", None)] + [c.weight for c in m.consumers]:
            if t is not None:
                undo.append((t, t.detach().clone()))
        smoothing.fold(m, s)
        logger.debug("%s%s -> %s: %s alpha %.2f, output error %.4g -> %.4g", prefix, m.producer_name,
                     ",".join(m.consumer_names), method, alpha, base, err)


def quantize_sequential(model: nn.Module, schemes: dict, batches: list, forward_fn: Callable,
                        build_layer: Callable, build_quantizers: Callable, progress=None,
                        undo: Optional[list] = None, block_hooks: Optional[tuple] = None) -> None:
    """Quantize every linear of ``schemes`` {name: scheme}, calibrated block by block.

    ``build_layer(name, linear, scheme, hessian or None)`` returns the quantized module that
    replaces the linear (it is put into the model here); ``build_quantizers(scheme)`` gives the
    (weight, activation) quantizers. Tensors changed in place by folded scaling are appended to
    ``undo`` as (tensor, original copy) so that a caller can put them back. ``block_hooks``:
    (before(i, block), after(i, block)) called around each block's turn, e.g. to load its weights
    just before it is calibrated and to write and free them once it has produced the next block's
    inputs (streaming from disk: only one block is ever in memory). Calibration activations
    beyond ``activation_store.activation_limit()`` are carried from block to block on disk.
    """
    undo = [] if undo is None else undo
    list_name, blocks = find_blocks(model, schemes)
    done, info = set(), {}
    live = []  # block inputs on disk, removed however this ends
    try:
        _quantize_blocks(model, schemes, batches, forward_fn, build_layer, build_quantizers, progress, undo,
                         block_hooks, list_name, blocks, done, info, live)
    finally:
        for store in live:
            store.close()


def _quantize_blocks(model, schemes, batches, forward_fn, build_layer, build_quantizers, progress, undo,
                     block_hooks, list_name, blocks, done, info, live) -> None:
    inputs = None
    if blocks is not None:
        inputs = merge_inputs(capture_block_inputs(model, blocks[0], batches, forward_fn))
        if hidden_bytes(inputs) > activation_limit():
            logger.info("calibration activations (%.0f MB) go to disk", hidden_bytes(inputs) / 2**20)
            inputs = spill(inputs)
            live.append(inputs)
        items = list(enumerate(blocks))
        for i, block in (progress(items, desc="calibrated quantization") if progress else items):
            prefix = f"{list_name}.{i}." if list_name else f"{i}."
            if block_hooks is not None:
                block_hooks[0](i, block)
            local = {n[len(prefix):]: s for n, s in schemes.items() if n.startswith(prefix)}
            if local:
                _scale_block(block, prefix, local, inputs, build_quantizers, undo)
                targets = {n: block.get_submodule(n) for n, s in local.items() if uses_hessian(s)}
                hess = _collect(block, inputs, targets)[0] if targets else {}
                for n, s in local.items():
                    h = hess[n].hessian() if n in hess else None
                    _set_child(block, n, build_layer(prefix + n, block.get_submodule(n), s, h))
                    done.add(prefix + n)
            outputs = run_block(block, inputs, info)
            if isinstance(inputs, SpilledInputs):
                live.append(outputs)
                inputs.close()  # the previous block's inputs are no longer needed
            inputs = outputs
            if block_hooks is not None:
                block_hooks[1](i, block)
    elif block_hooks is not None:
        raise ValueError("block_hooks given but the model has no repeated blocks to quantize one at a time")
    rest = {n: s for n, s in schemes.items() if n not in done}
    if not rest:
        return
    # Outside the blocks: one pass of the model collects the remaining Hessians, with the blocks
    # replaced by a replay of the last block's (quantized) outputs, so they are not run again.
    targets = {n: m for n, m in ((n, model.get_submodule(n)) for n, s in rest.items() if uses_hessian(s))}
    hess = {}
    if targets:
        wrapped = [(tuple(), {"__batch__": b}) for b in batches]
        adapter = _ForwardAdapter(model, forward_fn)
        if blocks is not None:
            with _replaying(blocks, inputs, len(batches), info.get("tuple", False)):
                hess = _collect(adapter, wrapped, targets)[0]
        else:
            hess = _collect(adapter, wrapped, targets)[0]
    for n, s in rest.items():
        h = hess[n].hessian() if n in hess else None
        _set_child(model, n, build_layer(n, model.get_submodule(n), s, h))


class _ForwardAdapter(nn.Module):
    """Lets _collect drive a whole model through forward_fn(model, batch)."""

    def __init__(self, model, forward_fn):
        super().__init__()
        self.model = model
        self._forward_fn = forward_fn

    def forward(self, __batch__):
        return self._forward_fn(self.model, __batch__)
