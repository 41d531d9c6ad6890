"""Import a compressed-tensors folder (llm-compressor's GPTQ/AWQ W4A16, W8A16, FP8 and W8A8
output, or ours) as QuantLinear layers built from the stored codes: nothing is dequantized and
quantized again. The layouts are the ones compressed_tensors.py describes (its inverse):
``pack-quantized`` int32 words read back as our little-endian bit stream, zero points unpacked
down each column; one value per byte (``naive-``, ``float-``, ``int-quantized``): e4m3 weights are
our fp8 codes as they are, int8-held values q become our codes q + 2^(bits-1). Dynamic per-token int8 / fp8 input
activations become our activation quantizers. Block-scaled weights (``nvfp4-pack-quantized``,
``mxfp4-pack-quantized``, ``mxfp6-pack-quantized``, ``mxfp8-quantized``) are our nvfp4 / MX bytes
as they are, with their E4M3 or E8M0 scale bytes and (nvfp4) the global scale.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

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


# Block-scaled layouts -> (our format, its element's compressed-tensors num_bits, block size)
BLOCK_IMPORTS = {"nvfp4-pack-quantized": ("nvfp4", 4, 16), "mxfp4-pack-quantized": ("mxfp4_e2m1", 4, 32),
                 "mxfp6-pack-quantized": ("mxfp6_e2m3", 6, 32), "mxfp8-quantized": ("mxfp8_e4m3", 8, 32)}
IMPORTED = (FORMAT, "naive-quantized", "float-quantized", "int-quantized") + tuple(BLOCK_IMPORTS)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _group_size(args: dict, where: str) -> int:
    """Our group_size encoding of a weight strategy: > 0 per group, 0 per channel, -1 per tensor."""
    strategy = args.get("strategy")
    if strategy == "group":
        group = int(args.get("group_size") or 0)
        if group <= 0:
            raise ExportError(f"{where}: group strategy with group_size {args.get('group_size')!r}")
        return group
    if strategy in ("channel", "tensor"):
        return 0 if strategy == "channel" else -1
    raise ExportError(f"{where}: strategy {strategy!r} is not imported (group, channel and tensor are)")


def _packed_codes(name: str, args: dict, tensors: dict, out_f: int, in_f: int, where: str):
    """(format, uint8 codes [out, ceil(in * bits / 8)]) from a pack-quantized layer's int32 words."""
    if args.get("type") != "int" or not 1 <= int(args.get("num_bits") or 0) <= 8:
        raise ExportError(f"{where}: {args.get('type')} {args.get('num_bits')}-bit weights in {FORMAT} are not "
                          f"imported (int1..int8 are)")
    bits = int(args["num_bits"])
    words = _tensor(tensors, name, "weight_packed", where)
    shape = tensors.get(f"{name}.weight_shape")
    if shape is not None and [int(v) for v in shape.tolist()] != [out_f, in_f]:
        raise ExportError(f"{where}: weight_shape {shape.tolist()} does not match the model's [{out_f}, {in_f}]")
    row_bytes = (in_f * bits + 7) // 8
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[0] != out_f or words.shape[1] * 4 < row_bytes:
        raise ExportError(f"{where}: weight_packed is {words.dtype} {list(words.shape)}; expected int32 "
                          f"[{out_f}, {(in_f * bits + 31) // 32}]")
    data = words.contiguous().view(torch.uint8).reshape(out_f, -1)
    return f"int{bits}", data[:, :row_bytes].contiguous()


def _unpacked_codes(name: str, args: dict, tensors: dict, out_f: int, in_f: int, where: str):
    """(format, our packed uint8 codes) from a weight stored one value per byte (naive-, int- and
    float-quantized): 8-bit float as e4m3 bits (our fp8 codes as they are), int1..int8 as signed
    int8 values q (our codes q + 2^(bits-1), packed at their width)."""
    from .. import ops

    typ, bits = args.get("type"), int(args.get("num_bits") or 0)
    if not ((typ == "float" and bits == 8) or (typ == "int" and 1 <= bits <= 8)):
        raise ExportError(f"{where}: {typ} {bits}-bit weights stored one per byte are not imported (fp8 e4m3 and "
                          f"int1..int8 are)")
    w = _tensor(tensors, name, "weight", where)
    dtype = torch.float8_e4m3fn if typ == "float" else torch.int8
    if w.dtype != dtype or tuple(w.shape) != (out_f, in_f):
        raise ExportError(f"{where}: weight is {w.dtype} {list(w.shape)}; expected {dtype} [{out_f}, {in_f}]")
    if typ == "float":
        if torch.isnan(w.float()).any():
            raise ExportError(f"{where}: the fp8 weight holds NaN codes; a weight must be finite")
        return "fp8_e4m3", w.contiguous().view(torch.uint8).clone()
    codes = w.to(torch.int16) + 2 ** (bits - 1)
    if int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits:
        raise ExportError(f"{where}: weight values {int(w.min())}..{int(w.max())} are outside the int{bits} range")
    codes = codes.to(torch.uint8)
    return f"int{bits}", codes if bits == 8 else ops.pack(codes, bits)


def _block_layer(name: str, linear: nn.Linear, layout: str, group: dict, tensors: dict, where: str) -> QuantLinear:
    """A weight-only nvfp4 / MX layer from its stored bytes (the inverse of compressed_tensors.py)."""
    from ..formats import packed_row_bytes

    fmt, bits, block = BLOCK_IMPORTS[layout]
    args = group["weights"]
    if (args.get("type") != "float" or int(args.get("num_bits") or 0) != bits or int(args.get("group_size") or 0)
            != block or not args.get("symmetric", True)):
        raise ExportError(f"{where}: {layout} with weights {args.get('type')} {args.get('num_bits')}-bit, group_size "
                          f"{args.get('group_size')}; imported: float {bits}-bit symmetric, group_size {block}")
    if group.get("input_activations"):
        raise ExportError(f"{where}: {layout} with quantized input activations is not imported (weight-only is)")
    out_f, in_f = linear.out_features, linear.in_features
    if layout == "mxfp8-quantized":
        data = _tensor(tensors, name, "weight", where)
        if data.dtype != torch.float8_e4m3fn:
            raise ExportError(f"{where}: weight is {data.dtype}; expected float8_e4m3fn")
        data = data.view(torch.uint8)
    else:
        data = _tensor(tensors, name, "weight_packed", where)
    row_bytes = packed_row_bytes(in_f, bits)
    if data.dtype != torch.uint8 or tuple(data.shape) != (out_f, row_bytes):
        raise ExportError(f"{where}: the packed weight is {data.dtype} {list(data.shape)}; expected uint8 "
                          f"[{out_f}, {row_bytes}]")
    scale = _tensor(tensors, name, "weight_scale", where)
    scale_dtypes = (torch.uint8, torch.float8_e4m3fn) if fmt == "nvfp4" else (torch.uint8,)
    if scale.dtype not in scale_dtypes or tuple(scale.shape) != (out_f, -(-in_f // block)):
        raise ExportError(f"{where}: weight_scale is {scale.dtype} {list(scale.shape)}; expected "
                          f"{' or '.join(str(d) for d in scale_dtypes)} [{out_f}, {-(-in_f // block)}]")
    zero = None
    if fmt == "nvfp4":
        zero = _tensor(tensors, name, "weight_global_scale", where).float().reshape(-1)
        if zero.numel() != 1:
            raise ExportError(f"{where}: weight_global_scale holds {zero.numel()} values; expected one")
    packed = PackedTensor(data.contiguous().clone(), scale.view(torch.uint8).contiguous().clone(), zero, fmt, True,
                          block, (out_f, in_f))
    return QuantLinear.from_packed(linear, packed, None)


def _tensor(tensors: dict, name: str, key: str, where: str) -> torch.Tensor:
    try:
        return tensors[f"{name}.{key}"]
    except KeyError:
        raise ExportError(f"{where}: tensor {name}.{key} is missing") from None


def _act_quantizer(args: Optional[dict], dtype: torch.dtype, where: str):
    """Our activation quantizer for a config group's ``input_activations`` (None: float)."""
    if not args:
        return None
    from ..quantizers.registry import lookup

    fmt = {("int", 8): "int8", ("float", 8): "fp8_e4m3"}.get((args.get("type"), int(args.get("num_bits") or 0)))
    if fmt is None or not args.get("symmetric", True) or args.get("strategy") != "token" or not args.get("dynamic"):
        raise ExportError(f"{where}: input activations {args.get('type')} {args.get('num_bits')}-bit "
                          f"{args.get('strategy')} {'dynamic' if args.get('dynamic') else 'static'} are not imported; "
                          f"imported: int8 or fp8 (float 8-bit), symmetric, dynamic per token")
    q_cls, cfg = lookup(fmt)
    kwargs = {"granularity": "per_channel", "dtype": _DTYPE_NAMES.get(dtype, "float32")}
    if fmt == "int8":
        kwargs["symmetric"] = True
    return q_cls(cfg(**kwargs))


def _layer(name: str, linear: nn.Linear, layout: str, group: dict, tensors: dict, path: str,
           dtype: torch.dtype) -> QuantLinear:
    where = f"compressed-tensors folder {path}: layer {name}"
    args = group.get("weights")
    if not args:
        raise ExportError(f"{where}: its config group quantizes no weights; only weight-quantized layers are imported")
    if layout in BLOCK_IMPORTS:
        return _block_layer(name, linear, layout, group, tensors, where)
    symmetric = bool(args.get("symmetric", True))
    out_f, in_f = linear.out_features, linear.in_features
    group_size = _group_size(args, where)
    if layout == FORMAT:
        fmt, data = _packed_codes(name, args, tensors, out_f, in_f, where)
    else:
        fmt, data = _unpacked_codes(name, args, tensors, out_f, in_f, where)
        if not symmetric and fmt == "fp8_e4m3":
            raise ExportError(f"{where}: asymmetric fp8 weights are not imported (fp8 is symmetric)")
    bits = int(args["num_bits"])
    groups = 1 if group_size <= 0 else -(-in_f // group_size)
    scale = _tensor(tensors, name, "weight_scale", where)
    expected = (1, 1) if group_size == -1 else (out_f, groups)
    if group_size == -1 and scale.numel() == 1:  # per tensor: [1] or [] in the file
        scale = scale.reshape(expected)
    if tuple(scale.shape) != expected:
        raise ExportError(f"{where}: weight_scale is {list(scale.shape)}; expected {list(expected)}")
    if not scale.is_floating_point():
        raise ExportError(f"{where}: weight_scale must be floating point; got {scale.dtype}")
    zero = None
    if not symmetric:
        zp = tensors.get(f"{name}.weight_zero_point")
        if zp is None:
            raise ExportError(f"{where}: an asymmetric scheme needs weight_zero_point")
        rows = 1 if group_size == -1 else out_f
        if zp.dtype == torch.int32 and zp.shape[0] != rows:
            zero = _unpack_columns(zp, bits, rows)
        else:  # unpacked (older writers, int-quantized): signed zero points
            zero = zp.float().reshape(scale.shape) + 2 ** (bits - 1)
        zero = zero.to(scale.dtype)
    scale_dtype = scale.dtype if scale.dtype in _DTYPE_NAMES else torch.float32
    packed = PackedTensor(data, scale.to(scale_dtype).contiguous(), zero, fmt, symmetric, group_size,
                          (out_f, in_f))
    return QuantLinear.from_packed(linear, packed, _act_quantizer(group.get("input_activations"), dtype, where))


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
        if fmt not in IMPORTED:
            raise ExportError(f"compressed-tensors folder {path}: config group {gname} is {fmt!r}; imported: "
                              f"{', '.join(IMPORTED)}")
        for name, m in modules.items():
            if not isinstance(m, nn.Linear) or name in done or any(_matches(name, m, t) for t in ignore):
                continue
            if any(_matches(name, m, t) for t in group.get("targets", [])):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child,
                        _layer(name, m, fmt, group, tensors, path, dtype))
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
