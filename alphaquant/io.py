"""Save and load quantized models: packed tensors in safetensors, the plan in its metadata."""
from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn

from .nn.quant_linear import QuantLinear
from .plans import apply_plan

FORMAT_TAG = "alphaquant/1"


def _layer_meta(model: nn.Module) -> dict:
    meta = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            entry = {"fmt": m.fmt, "symmetric": m.symmetric, "group_size": m.group_size,
                     "shape": [m.out_features, m.in_features]}
            aq = m.act_quantizer
            if aq is not None and aq.is_static:
                entry["act_scale"] = aq.static_scale.flatten().tolist()
                entry["act_scale_shape"] = list(aq.static_scale.shape)
                if aq.static_zero_point is not None:
                    entry["act_zero_point"] = aq.static_zero_point.flatten().tolist()
            meta[name] = entry
    return meta


def save_quantized(model: nn.Module, path: str, plan: dict) -> None:
    """Write the model's state_dict (packed weights, scales, other parameters) and the plan.

    Written to a temporary file in the same folder and renamed, so a failure leaves no
    half-written checkpoint behind.
    """
    from safetensors.torch import save_file

    seen = {}
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        tensors[k] = v.clone() if key in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
        seen[key] = k
    metadata = {"format": FORMAT_TAG, "plan": json.dumps(plan), "layers": json.dumps(_layer_meta(model))}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".alphaquant-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_metadata(path: str) -> dict:
    """The AlphaQuant metadata of a checkpoint; clear errors for unreadable or foreign files."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupted): {e}") from e
    if meta.get("format") != FORMAT_TAG:
        raise ValueError(f"{path} is not an AlphaQuant checkpoint (metadata format {meta.get('format')!r}, "
                         f"expected {FORMAT_TAG!r})")
    return {"plan": json.loads(meta["plan"]), "layers": json.loads(meta["layers"])}


def load_quantized(model: nn.Module, path: str, device=None) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` into a float model of the same
    architecture (its nn.Linear layers are replaced by empty QuantLinears first)."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    apply_plan(model, meta["plan"], quantize_weights=False)
    layers = _layer_meta(model)
    if set(layers) != set(meta["layers"]):
        missing, extra = sorted(set(meta["layers"]) - set(layers)), sorted(set(layers) - set(meta["layers"]))
        raise ValueError(f"checkpoint {path} does not match this model: layers only in the checkpoint {missing[:5]}, "
                         f"only in the model {extra[:5]}")
    for name, entry in meta["layers"].items():
        ours = layers[name]
        for key in ("fmt", "symmetric", "group_size", "shape"):
            if ours[key] != entry[key]:
                raise ValueError(f"checkpoint {path}: layer {name} has {key}={entry[key]!r} but the plan gives "
                                 f"{ours[key]!r} for this model")
    try:
        state = load_file(path, device=str(device) if device is not None else "cpu")
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupted): {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match this model's architecture: {e}") from e
    for name, entry in meta["layers"].items():
        if "act_scale" in entry:
            m = model.get_submodule(name)
            shape = entry["act_scale_shape"]
            zp = entry.get("act_zero_point")
            m.act_quantizer.set_static_scales(torch.tensor(entry["act_scale"]).reshape(shape),
                                              None if zp is None else torch.tensor(zp).reshape(shape))
    return model
