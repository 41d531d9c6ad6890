"""Import a compressed-tensors ``pack-quantized`` folder (llm-compressor's GPTQ/AWQ W4A16 and
W8A16 output, or ours) as QuantLinear layers built from the stored codes: nothing is
dequantized and quantized again. The layout is the one compressed_tensors.py describes (its
inverse): int32 words read back as our little-endian bit stream, zero points unpacked down
each column.
"""
from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from ..nn.quant_linear import QuantLinear
from ..packed import PackedTensor
from .compressed_tensors import FORMAT, ExportError, is_compressed_tensors_folder  # noqa: F401 (re-exported)


def _matches(name: str, module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or any(c.__name__ == target for c in type(module).__mro__)


def _unpack_columns(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """[ceil(rows * bits / 32), groups] int32 -> [rows, groups] codes (float32)."""
    from .. import ops

    cols = words.t().contiguous().view(torch.uint8)  # [groups, words * 4]
    need = (rows * bits + 7) // 8
    return ops.unpack(cols[:, :need].contiguous(), bits, rows).t().float()


def _layer(name: str, linear: nn.Linear, args: dict, tensors: dict, path: str) -> QuantLinear:
    where = f"compressed-tensors folder {path}: layer {name}"
    if args.get("type") != "int" or not 1 <= int(args.get("num_bits", 0)) <= 8:
        raise ExportError(f"{where}: {args.get('type')} {args.get('num_bits')}-bit weights are not imported (int1..int8 "
                          f"{FORMAT} are)")
    bits, symmetric, strategy = int(args["num_bits"]), bool(args.get("symmetric", True)), args.get("strategy")
    out_f, in_f = linear.out_features, linear.in_features
    if strategy == "group":
        group = int(args["group_size"])
    elif strategy == "channel":
        group = 0
    else:
        raise ExportError(f"{where}: strategy {strategy!r} is not imported (group and channel are)")
    try:
        words, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
    except KeyError as e:
        raise ExportError(f"{where}: tensor {e.args[0]} is missing") from None
    shape = tensors.get(f"{name}.weight_shape")
    if shape is not None and [int(v) for v in shape.tolist()] != [out_f, in_f]:
        raise ExportError(f"{where}: weight_shape {shape.tolist()} does not match the model's [{out_f}, {in_f}]")
    row_bytes = (in_f * bits + 7) // 8
    data = words.contiguous().view(torch.uint8).reshape(out_f, -1)
    if words.dtype != torch.int32 or data.shape[1] < row_bytes:
        raise ExportError(f"{where}: weight_packed is {words.dtype} {list(words.shape)}; expected int32 "
                          f"[{out_f}, {(in_f * bits + 31) // 32}]")
    data = data[:, :row_bytes].contiguous()
    groups = 1 if group == 0 else -(-in_f // group)
    if tuple(scale.shape) != (out_f, groups):
        raise ExportError(f"{where}: weight_scale is {list(scale.shape)}; expected [{out_f}, {groups}]")
    if not scale.is_floating_point():
        raise ExportError(f"{where}: weight_scale must be floating point; got {scale.dtype}")
    zero = None
    if not symmetric:
        zp = tensors.get(f"{name}.weight_zero_point")
        if zp is None:
            raise ExportError(f"{where}: an asymmetric scheme needs weight_zero_point")
        if zp.dtype == torch.int32 and zp.shape[0] != out_f:
            zero = _unpack_columns(zp, bits, out_f)
        else:  # unpacked (older writers): signed zero points
            zero = zp.float().reshape(out_f, groups) + 2 ** (bits - 1)
        zero = zero.to(scale.dtype)
    scale_dtype = scale.dtype if scale.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    packed = PackedTensor(data, scale.to(scale_dtype).contiguous(), zero, f"int{bits}", symmetric, group,
                          (out_f, in_f))
    return QuantLinear.from_packed(linear, packed)


def load_compressed_tensors(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None) from a compressed-tensors folder; linear weights stay packed."""
    import transformers
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    qc = raw.pop("quantization_config", None) or {}
    if qc.get("quantization_status", "compressed") != "compressed":
        raise ExportError(f"compressed-tensors folder {path}: status {qc.get('quantization_status')!r}; only "
                          f"compressed checkpoints are imported")
    config = transformers.AutoConfig.for_model(**raw)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(path, name)))
    ignore = qc.get("ignore") or []
    modules = dict(model.named_modules())
    done = set()
    for gname, group in (qc.get("config_groups") or {}).items():
        fmt = group.get("format") or qc.get("format")
        if fmt != FORMAT:
            raise ExportError(f"compressed-tensors folder {path}: config group {gname} is {fmt!r}; only {FORMAT} is "
                              f"imported so far")
        if group.get("input_activations"):
            raise ExportError(f"compressed-tensors folder {path}: config group {gname} quantizes activations; not "
                              f"imported yet")
        for name, m in modules.items():
            if not isinstance(m, nn.Linear) or name in done or any(_matches(name, m, t) for t in ignore):
                continue
            if any(_matches(name, m, t) for t in group.get("targets", [])):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child,
                        _layer(name, m, group["weights"], tensors, path))
                done.add(name)
    state = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in done}
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in state.items()}, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in done]
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ExportError(f"compressed-tensors folder {path} does not match its config: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001  a folder without a tokenizer still holds a model
        tokenizer = None
    return model.eval(), tokenizer
