"""Checks made before a long quantization whose result is to be exported: will the plan's layers
fit the format, and may the output path be written? Both fail fast, before any work is lost."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from .compressed_tensors import NO_QUANTIZED_EMBEDDINGS, ExportError, _is_export_folder, _layer_scheme
from .gguf_file import CONVERT_HINT, CONVERT_TYPES, check_convert_type, gguf_type

FORMATS = ("compressed-tensors", "gguf")


def is_gguf_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return not os.path.islink(path) and f.read(4) == b"GGUF"
    except OSError:
        return False


def check_export_target(out: str, to: str, force: bool, inputs: tuple = ()) -> None:
    """Raise ExportError (what is wrong) or FileExistsError (exists, no ``force``) unless ``out``
    may be written as a ``to`` export: a GGUF export is one file and replaces only a GGUF file, a
    compressed-tensors export is a folder and replaces only such an export; never over an input."""
    real = os.path.realpath(out)
    for p in inputs:
        rp = os.path.realpath(p)
        if rp == real or rp.startswith(real.rstrip(os.sep) + os.sep):
            raise ExportError(f"--out {out} is or holds the input {p}; writing there would destroy it")
    if to == "gguf":
        if os.path.isdir(out):
            raise ExportError(f"--out {out} is a folder; a GGUF export is one file")
        if os.path.lexists(out):
            if not force:
                raise FileExistsError(f"{out} exists")
            if not is_gguf_file(out):
                raise ExportError(f"--out {out} is not a GGUF file; it is not replaced")
    elif to == "compressed-tensors":
        if os.path.lexists(out):
            if not force:
                raise FileExistsError(f"{out} exists")
            if os.path.islink(out) or not _is_export_folder(out):
                raise ExportError(f"--out {out} is not a compressed-tensors export folder; it is not replaced")
    else:
        raise ExportError(f"unknown export format {to!r}; known: {', '.join(FORMATS)}")


def check_plan_exports(model: nn.Module, plan: dict, to: str, convert: Optional[str] = None) -> None:
    """Raise ExportError if applying ``plan`` to ``model`` gives a layer (or a model) that ``to``
    cannot hold (for GGUF with ``convert``: cannot hold nor convert to that type). Each distinct
    scheme is tried on a small random weight of its layer's width: the layouts, not the values,
    decide whether a layer exports."""
    from ..nn.quant_embedding import QuantEmbedding
    from ..nn.quant_linear import QuantLinear
    from ..plans import build_quantizers, load_plan, plan_embeddings, plan_layers

    if convert is not None and (to != "gguf" or convert not in CONVERT_TYPES):
        raise ExportError(f"convert={convert!r}: layers convert to a GGUF type, one of {', '.join(CONVERT_TYPES)}")
    plan = load_plan(plan)
    if plan.get("rotation", "none") != "none":
        raise ExportError(f"a rotated plan (rotation {plan['rotation']!r}) does not export to {to}: its down_proj "
                          f"layers rotate their input online, which the engines reading {to} do not do")
    if to == "gguf":
        cfg = getattr(model, "config", None)
        if getattr(cfg, "model_type", None) not in ("llama", "mistral") and "Llama" not in type(model).__name__:
            raise ExportError(f"GGUF export supports Llama-family models; got {type(model).__name__}")
    embeddings = plan_embeddings(model, plan)
    if embeddings and to == "compressed-tensors":
        raise ExportError(NO_QUANTIZED_EMBEDDINGS.format(name=next(iter(embeddings))))
    tried = set()
    gen = torch.Generator().manual_seed(0)
    for name, scheme in embeddings.items():  # GGUF: token_embd takes the same block types
        wq, _ = build_quantizers(scheme)
        probe = nn.Embedding(2, model.get_submodule(name).embedding_dim)
        try:
            _gguf_or_convert(QuantEmbedding.from_embedding(probe, wq, scheme=scheme), probe.embedding_dim, convert)
        except ExportError as e:
            raise ExportError(f"embedding {name}: {e}") from None
    for name, scheme in plan_layers(model, plan).items():
        linear = model.get_submodule(name)
        key = (json.dumps(scheme, sort_keys=True, default=str), linear.in_features)
        if key in tried:
            continue
        tried.add(key)
        probe = nn.Linear(linear.in_features, 2, bias=linear.bias is not None)
        with torch.no_grad():
            probe.weight.copy_(torch.randn(probe.weight.shape, generator=gen) * 0.02)
        wq, aq = build_quantizers(scheme)
        layer = QuantLinear.from_packed(probe, wq.quantize_weight(probe.weight), aq, scheme=scheme)
        try:
            if to == "gguf":
                _gguf_or_convert(layer, linear.in_features, convert)
            else:
                _layer_scheme(name, layer)
        except ExportError as e:
            msg = str(e)
            raise ExportError(msg if msg.startswith("layer ") else f"layer {name}: {msg}") from None


def _gguf_or_convert(layer, k: int, convert: Optional[str]) -> None:
    try:
        gguf_type(layer)
    except ExportError as e:
        if getattr(layer, "input_rotation", None) is not None:
            raise
        if convert is None:
            raise ExportError(f"{e}{CONVERT_HINT}") from None
        check_convert_type(convert, k)
