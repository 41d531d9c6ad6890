"""Placing a loaded model's layers on devices: ``device_map`` as transformers and accelerate take it.

``device_map`` is "auto" (the GPUs first, as much as fits in each, the rest on the CPU: accelerate's
``infer_auto_device_map`` over the packed sizes), one device for everything ("cpu", "cuda:0", 0),
or a dict {module name: device} ("" for the whole model). The checkpoint's tensors are allocated
straight on their device (no CPU copy of a GPU layer), and when the model spans several devices
accelerate's hooks move activations from one to the next. Offloading to disk is not supported.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

DeviceMap = Union[str, int, torch.device, dict]


def _device(value, where: str) -> torch.device:
    if isinstance(value, bool):
        raise ValueError(f"device_map: {where} maps to {value!r}, which is not a device")
    if isinstance(value, int):
        value = f"cuda:{value}"
    if value in ("disk", "meta"):
        raise ValueError(f"device_map: {where} maps to {value!r}; layers load onto a device (cpu, cuda:N), "
                         f"offloading to disk is not supported")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map: {where} maps to {value!r}, which is not a device (use 'cpu', 'cuda', "
                         f"'cuda:N' or a GPU index)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device_map: {where} maps to {value!r} but no CUDA device is available")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device_map: {where} maps to {value!r} but only {torch.cuda.device_count()} "
                             f"CUDA devices exist")
        dev = torch.device("cuda", index)
    elif dev.type != "cpu":
        raise ValueError(f"device_map: {where} maps to {value!r}; layers load onto cpu or cuda devices")
    return dev


def resolve_device_map(model: nn.Module, device_map: DeviceMap,
                       max_memory: Optional[dict] = None) -> dict:
    """{module name: torch.device} for ``model`` (plan applied, possibly on the meta device; its
    packed buffers give the sizes). ValueError for names that are not modules of the model,
    values that are not devices, or tensors the map leaves without a device."""
    if isinstance(device_map, str) and device_map == "auto":
        if not torch.cuda.is_available():
            return {"": torch.device("cpu")}
        from accelerate import infer_auto_device_map

        no_split = list(getattr(model, "_no_split_modules", None) or [])
        inferred = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
        bad = sorted(n for n, d in inferred.items() if d == "disk")
        if bad:
            raise ValueError(f"device_map='auto': the model does not fit in the GPUs' and the CPU's memory "
                             f"({len(bad)} modules would go to disk, e.g. {bad[0]}); offloading to disk is "
                             f"not supported")
        device_map = inferred
    if not isinstance(device_map, dict):
        return {"": _device(device_map, "the model")}
    modules = dict(model.named_modules())
    out = {}
    for name, value in device_map.items():
        if not isinstance(name, str) or name not in modules:
            raise ValueError(f"device_map names {name!r}, which is not a module of this model (e.g. "
                             f"{next((n for n in modules if n), '')!r}; '' is the whole model)")
        out[name] = _device(value, repr(name) if name else "the model")
    uncovered = [k for k in model.state_dict(keep_vars=True) if _owner(k, out) is None]
    if uncovered:
        raise ValueError(f"device_map leaves {len(uncovered)} tensors without a device (e.g. {uncovered[0]}); "
                         f"map their modules or add '' for the rest")
    return out


def _owner(tensor_name: str, device_map: dict) -> Optional[str]:
    """The most specific module of ``device_map`` that holds ``tensor_name``."""
    best = None
    for name in device_map:
        if name == "" or tensor_name.startswith(name + "."):
            if best is None or len(name) > len(best):
                best = name
    return best


def allocate(model: nn.Module, device_map: dict, empty: bool = True) -> None:
    """Give every tensor of ``model`` its mapped device (the whole model first, then more specific
    modules over it): uninitialized memory for a meta-device model (``empty``), else moved
    there. ValueError when tied tensors are mapped to different devices (one tensor cannot be on
    two)."""
    for name in sorted(device_map, key=len):
        m = model.get_submodule(name)
        m.to_empty(device=device_map[name]) if empty else m.to(device_map[name])
    for k, t in model.state_dict(keep_vars=True).items():
        want = device_map[_owner(k, device_map)]
        if t.device != want:
            raise ValueError(f"device_map puts {k} on {want}, but it is tied to a tensor mapped to {t.device}; "
                             f"map tied modules (an embedding and its head) to one device")


def dispatch(model: nn.Module, device_map: dict) -> nn.Module:
    """After loading: when the model spans several devices, hooks that move each module's inputs
    to its device (accelerate's dispatch_model), outputs coming back to the first device."""
    if len(set(device_map.values())) <= 1:
        return model
    from accelerate import dispatch_model

    return dispatch_model(model, device_map={k: str(v) for k, v in device_map.items()})


def single_device(device_map: dict) -> Optional[torch.device]:
    """The one device of ``device_map``, or None when it spans several."""
    devices = set(device_map.values())
    return next(iter(devices)) if len(devices) == 1 else None


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its input embedding (the first layer)."""
    get = getattr(model, "get_input_embeddings", None)
    first = get() if get is not None else None
    first = first if first is not None else model
    t = next(iter(first.parameters()), None)
    t = t if t is not None else next(iter(first.buffers()), None)
    return t.device if t is not None else torch.device("cpu")
