"""Export to a compressed-tensors folder (what llm-compressor writes, vLLM and transformers load).

fp8_e4m3 weights become ``float-quantized`` (``weight`` float8_e4m3fn, our codes are its bits),
int8 weights with int8 activations ``int-quantized`` (``weight`` int8); dynamic per-token int8 /
fp8 activations are declared as ``input_activations`` (strategy token, dynamic).

Integer weights become the ``pack-quantized`` format of compressed-tensors 0.20
(compressors/pack_quantized): per layer ``weight_packed`` (int32 words holding the codes as one
little-endian bit stream per row, element 0 in the lowest bits), ``weight_scale`` (out, groups)
or (out, 1), ``weight_shape`` [out, in] and, asymmetric only, ``weight_zero_point`` (int32, its
codes packed the same way down each column: (ceil(out * bits / 32), groups)). Codes are offset by
2^(bits-1) there (stored u = q + 2^(bits-1) for a signed q, value (q - zp) * scale): our
symmetric codes (q - qmin) and our asymmetric codes and integer zero points are those same bits,
so the packed bytes are copied, not re-quantized. Float zero points have no such form and are
refused (quantize with ``zero_point="integer"``).

Block-scaled weights copy their bytes too: nvfp4 becomes ``nvfp4-pack-quantized``
(``weight_packed`` uint8 [out, in/2], two E2M1 codes per byte with element 0 in the low nibble
as ours; ``weight_scale`` float8_e4m3fn [out, in/16], our scale bytes; ``weight_global_scale``
float32 [1], which compressed-tensors divides the block scales by, as we do). The MX formats the
library has take ``weight_scale`` uint8 E8M0 exponents [out, in/32], our scale bytes:
mxfp4_e2m1 ``mxfp4-pack-quantized`` (the nvfp4 code layout), mxfp6_e2m3 ``mxfp6-pack-quantized``
(four 6-bit codes in three little-endian bytes, our bit stream) and mxfp8_e4m3 ``mxfp8-quantized``
(``weight`` float8_e4m3fn, our codes are its bits).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from ..formats import format_bits
from ..nn.quant_embedding import QuantEmbedding, TiedQuantLinear
from ..nn.quant_linear import QuantLinear

FORMAT = "pack-quantized"
EXPORTABLE = ("int2..int8 weights, symmetric or asymmetric with integer zero points, per group (dividing "
              "in_features) or per channel (pack-quantized); fp8_e4m3 weights (float-quantized); int8 per-channel "
              "weights with int8 activations (int-quantized); weight-only nvfp4 (nvfp4-pack-quantized), mxfp4_e2m1 "
              "(mxfp4-pack-quantized), mxfp6_e2m3 (mxfp6-pack-quantized) and mxfp8_e4m3 (mxfp8-quantized) with "
              "in_features a multiple of their block; activations float or int8/fp8 dynamic per token")
# Block-scaled formats -> (compressed-tensors format, strategy, scale dtype name as the library writes it)
BLOCK_LAYOUTS = {"nvfp4": ("nvfp4-pack-quantized", "tensor_group", "torch.float8_e4m3fn"),
                 "mxfp4_e2m1": ("mxfp4-pack-quantized", "group", "torch.uint8"),
                 "mxfp6_e2m3": ("mxfp6-pack-quantized", "group", "torch.uint8"),
                 "mxfp8_e4m3": ("mxfp8-quantized", "group", "torch.uint8")}


class ExportError(ValueError):
    """A model (or one of its layers) that this format cannot hold: says why and what can."""


NO_QUANTIZED_EMBEDDINGS = ("{name} is a quantized embedding (or a head tied to one); compressed-tensors checkpoints "
                           "hold float embeddings for the engines that load them: keep embeddings float in a plan "
                           "meant for this export (no override naming them)")


def _to_words(rows_of_bytes: torch.Tensor) -> torch.Tensor:
    """[r, n] uint8 -> [r, ceil(n / 4)] int32 (little-endian words, zero padded)."""
    r, n = rows_of_bytes.shape
    pad = (-n) % 4
    b = torch.nn.functional.pad(rows_of_bytes, (0, pad)) if pad else rows_of_bytes
    return b.contiguous().view(torch.int32).reshape(r, -1)


def _pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[out, groups] codes packed down each column: [ceil(out * bits / 32), groups] int32."""
    from .. import ops

    packed = ops.pack(codes.t().contiguous().to(torch.uint8), bits)  # [groups, ceil(out*bits/8)]
    return _to_words(packed).t().contiguous()


def _activation_args(name: str, m: QuantLinear) -> Optional[dict]:
    aq = m.act_quantizer
    if aq is None:
        return None
    if aq.fmt not in ("int8", "fp8_e4m3") or not aq.symmetric or aq.is_static or aq.config.granularity != "per_channel":
        raise ExportError(f"layer {name}: activations {aq.fmt} ({aq.config.granularity}, "
                          f"{'static' if aq.is_static else 'dynamic'}) do not export; exportable: int8 or fp8_e4m3, "
                          f"symmetric, dynamic per token (act_granularity per_channel)")
    return {"num_bits": 8, "type": "int" if aq.fmt == "int8" else "float", "symmetric": True, "strategy": "token",
            "group_size": None, "dynamic": True}


def _layer_scheme(name: str, m: QuantLinear) -> tuple:
    """(format, weights args, input activation args or None) of one layer, or ExportError."""
    fmt = m.fmt
    if fmt in BLOCK_LAYOUTS:
        return _block_scheme(name, m)
    exportable = fmt.startswith("int") or fmt == "fp8_e4m3"
    if not exportable or m.weight_codebook is not None:
        raise ExportError(f"layer {name}: {fmt} weights have no compressed-tensors form; exportable: {EXPORTABLE}")
    if m.input_rotation is not None:
        raise ExportError(f"layer {name} rotates its input online (a rotated plan): transformers does not apply "
                          f"compressed-tensors transforms; export a plan without rotation")
    acts = _activation_args(name, m)
    k = m.in_features
    if m.group_size > 0 and k % m.group_size == 0:  # (one whole group is a group too: fewer config groups)
        strategy, group = "group", m.group_size
    elif 0 < m.group_size < k:
        raise ExportError(f"layer {name}: group_size {m.group_size} does not divide in_features {k} (a short "
                          f"last group); compressed-tensors needs whole groups")
    elif m.group_size == -1:
        strategy, group = "tensor", None
    else:
        strategy, group = "channel", None
    if fmt == "fp8_e4m3":
        layout = "float-quantized"
    elif acts is not None:
        if fmt != "int8" or not m.symmetric or strategy != "channel":
            raise ExportError(f"layer {name}: quantized activations export with int8 symmetric per-channel weights "
                              f"(int-quantized) or fp8_e4m3 weights; got {fmt}"
                              f"{'' if m.symmetric else ' asymmetric'} {strategy}")
        layout = "int-quantized"
    else:
        layout = FORMAT
    if not m.symmetric:
        z = m.float_zero_points()
        if not torch.equal(z, z.round()) or not bool(((z >= 0) & (z <= 2 ** format_bits(fmt) - 1)).all()):
            raise ExportError(f"layer {name}: its zero points are not integers in the code range; quantize with "
                              f"zero_point='integer' (plan key \"zero_point\": \"integer\") to export asymmetric "
                              f"weights")
    weights = {"num_bits": format_bits(fmt), "type": "float" if fmt == "fp8_e4m3" else "int",
               "symmetric": m.symmetric, "strategy": strategy, "group_size": group, "dynamic": False}
    return layout, weights, acts


def _block_scheme(name: str, m: QuantLinear) -> tuple:
    layout, strategy, scale_dtype = BLOCK_LAYOUTS[m.fmt]
    if m.in_features % m.group_size:
        raise ExportError(f"layer {name}: in_features {m.in_features} is not a multiple of {m.fmt}'s block of "
                          f"{m.group_size} (a short last block); {layout} needs whole blocks")
    if m.input_rotation is not None:
        raise ExportError(f"layer {name} rotates its input online (a rotated plan): transformers does not apply "
                          f"compressed-tensors transforms; export a plan without rotation")
    if m.act_quantizer is not None:
        raise ExportError(f"layer {name}: {m.fmt} weights export with float activations ({layout}, weight-only); "
                          f"this layer quantizes its activations ({m.act_quantizer.fmt})")
    weights = {"num_bits": format_bits(m.fmt), "type": "float", "symmetric": True, "strategy": strategy,
               "group_size": m.group_size, "dynamic": False, "scale_dtype": scale_dtype}
    return layout, weights, None


def layer_tensors(m: QuantLinear, dtype: torch.dtype, layout: str) -> dict:
    """The compressed-tensors tensors of one layer in ``layout`` (its format, from _layer_scheme),
    without the module prefix."""
    if m.fmt in BLOCK_LAYOUTS:  # our packed bytes and scale bytes are the library's
        codes = m.weight_packed.detach().cpu().clone()
        out = {"weight": codes.view(torch.float8_e4m3fn)} if m.fmt == "mxfp8_e4m3" else {"weight_packed": codes}
        if m.fmt == "nvfp4":
            out["weight_scale"] = m.weight_scale.detach().cpu().view(torch.float8_e4m3fn).clone()
            out["weight_global_scale"] = m.weight_zero_point.detach().cpu().float().clone()
        else:
            out["weight_scale"] = m.weight_scale.detach().cpu().clone()
        if m.bias is not None:
            out["bias"] = m.bias.detach().cpu().to(dtype)
        return out
    bits = format_bits(m.fmt)
    scale = m.weight_scale.detach().cpu().to(dtype)
    scale = scale.reshape(1) if m.group_size == -1 else scale.reshape(m.out_features, -1)
    if layout == FORMAT:
        out = {"weight_packed": _to_words(m.weight_packed.cpu()), "weight_scale": scale,
               "weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64)}
    elif layout == "float-quantized":  # our fp8 codes are the e4m3fn bits
        out = {"weight": m.weight_packed.cpu().view(torch.float8_e4m3fn).clone(), "weight_scale": scale}
    else:  # int-quantized: signed int8 values (our symmetric codes are q + 128)
        out = {"weight": (m.weight_packed.cpu().to(torch.int16) - 128).to(torch.int8), "weight_scale": scale}
    if not m.symmetric:
        z = m.float_zero_points().detach().cpu().reshape(m.out_features, -1)
        out["weight_zero_point"] = _pack_columns(z.round().to(torch.uint8), bits)
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu().to(dtype)
    return out


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` entry of config.json for the model's QuantLinear layers."""
    groups, ignore = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (QuantEmbedding, TiedQuantLinear)):
            raise ExportError(NO_QUANTIZED_EMBEDDINGS.format(name=name))
        if isinstance(m, QuantLinear):
            key = json.dumps(_layer_scheme(name, m), sort_keys=True)
            groups.setdefault(key, []).append(name)
        elif isinstance(m, nn.Linear):
            ignore.append(name)
    if not groups:
        raise ExportError("the model has no quantized layers to export")
    config_groups = {}
    for i, (key, names) in enumerate(groups.items()):
        layout, weights, acts = json.loads(key)
        config_groups[f"group_{i}"] = {"targets": names, "weights": weights, "input_activations": acts,
                                       "output_activations": None, "format": layout}
    layouts = {g["format"] for g in config_groups.values()}
    return {"quant_method": "compressed-tensors", "format": layouts.pop() if len(layouts) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


def _float_dtype(model: nn.Module) -> torch.dtype:
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


def to_compressed_tensors(model: nn.Module, out_dir: str, tokenizer=None, force: bool = False,
                          dtype: Optional[torch.dtype] = None) -> None:
    """Write ``model`` (QuantLinear layers from a plan) as a compressed-tensors folder: config.json
    with its ``quantization_config``, model.safetensors, and the tokenizer if given. Refuses
    (ExportError, nothing written) layers this format cannot hold. Atomic: the folder is complete
    or absent."""
    from safetensors.torch import save_file

    from ..cli import atomic_folder

    qc = quantization_config(model)  # checks every layer before anything is written
    dtype = dtype or _float_dtype(model)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    tensors = {}
    layouts = {n: g["format"] for g in qc["config_groups"].values() for n in g["targets"]}
    for name, m in quantized.items():
        for key, t in layer_tensors(m, dtype, layouts[name]).items():
            tensors[f"{name}.{key}"] = t.contiguous()
    seen = set()
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in quantized:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:  # a tied weight: stored once, tied again by the config
            continue
        seen.add(ident)
        tensors[key] = (t.detach().cpu().to(dtype) if t.is_floating_point() else t.detach().cpu()).contiguous()
    config = model.config.to_dict()
    config["quantization_config"] = qc
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config["architectures"] = [type(model).__name__]
    head = getattr(model, "lm_head", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and emb is not None and getattr(head, "weight", None) is not emb.weight:
        config["tie_word_embeddings"] = False

    def fill(tmp: str) -> None:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir):
        if not force:
            raise FileExistsError(f"{out_dir} exists; pass force=True to replace it")
        if os.path.islink(out_dir) or not _is_export_folder(out_dir):
            raise ExportError(f"{out_dir} is not a compressed-tensors folder (config.json with a compressed-tensors "
                              f"quantization_config and model.safetensors); it is not replaced")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    atomic_folder.replace_folder(out_dir, fill)


def is_compressed_tensors_folder(path: str) -> bool:
    """Whether ``path`` has a config.json whose quantization_config is compressed-tensors'."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            qc = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


_EXPORT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                 "added_tokens.json"}


def _is_export_folder(path: str) -> bool:
    """Whether ``path`` holds only what this exporter writes (so that force may replace it)."""
    return (os.path.isdir(path) and is_compressed_tensors_folder(path)
            and os.path.isfile(os.path.join(path, "model.safetensors")) and set(os.listdir(path)) <= _EXPORT_FILES)
