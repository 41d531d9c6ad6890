"""Export a Llama-family model to a GGUF file that llama.cpp runs.

Block layouts are ggml's (ggml-common.h), 32 values per block along a row:
  Q8_0  fp16 d, int8 q[32]                        value = q * d
  Q4_0  fp16 d, 16 bytes: q[j] | q[j+16] << 4     value = (q - 8) * d
  Q4_1  fp16 d, fp16 m, 16 bytes as Q4_0          value = q * d + m
Our int8 symmetric codes are q + 128, our int4 symmetric codes are ggml's q (offset 8), our
asymmetric int4 codes are Q4_1's q with d = scale and m = -zero * scale: codes are copied, never
re-quantized. Scales must be fp16 values (quantize with ``scale_dtype`` float16) for the file to
hold exactly what our model computes with; Q4_1's m = -zero * scale is rounded to fp16 and the
largest resulting change of a weight is reported. Norms are F32, other float tensors F32 (or F16).
Layers whose format has no block type are refused, or, when the caller asks (``convert``),
decoded and re-quantized by ggml's own rules (gguf-py's quantizer) to the type asked for, with the
error this adds reported per tensor.
q_proj / k_proj rows are permuted per head into llama.cpp's interleaved rotary layout (rows
only: lossless on packed rows and their scales).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import ops
from ..nn.packed_weight import PackedWeightModule
from ..nn.quant_embedding import QuantEmbedding, TiedQuantLinear
from ..nn.quant_linear import QuantLinear
from .compressed_tensors import ExportError

BLOCK = 32
EXPORTABLE = ("int8 symmetric group 32 (Q8_0), int4 symmetric group 32 (Q4_0), int4 asymmetric group 32 (Q4_1); "
              "float layers as F32/F16")
CONVERT_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F16")  # what gguf-py quantizes: --convert targets
CONVERT_HINT = (f" (or convert it: convert=TYPE / --convert TYPE re-quantizes it to one of {', '.join(CONVERT_TYPES)}, "
                f"reporting the error added)")
_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_type(m: PackedWeightModule) -> str:
    """The GGUF block type holding this layer's (or embedding's) codes, or ExportError naming what
    exports."""
    if (getattr(m, "input_rotation", None) is not None or getattr(m, "act_quantizer", None) is not None
            or m.weight_codebook is not None):
        raise ExportError("layers with online rotation, quantized activations or code books do not export to "
                          f"GGUF; exportable: {EXPORTABLE}")
    k = m.packed_weight.shape[1]
    if m.group_size != BLOCK or k % BLOCK:
        raise ExportError(f"GGUF blocks hold 32 values of a row: group_size must be 32 and the row length a multiple "
                          f"of 32 (got group_size {m.group_size}, rows of {k}); exportable: {EXPORTABLE}")
    kind = {("int8", True): "Q8_0", ("int4", True): "Q4_0", ("int4", False): "Q4_1"}.get((m.fmt, m.symmetric))
    if kind is None:
        raise ExportError(f"{m.fmt}{'' if m.symmetric else ' asymmetric'} weights have no GGUF block type; "
                          f"exportable: {EXPORTABLE}")
    s = m.weight_scale.detach().float()
    if not torch.equal(s.half().float(), s) or (m.weight_zero_point is not None and not torch.isfinite(
            (m.float_zero_points() * s).half().float()).all()):
        raise ExportError("GGUF stores fp16 scales: quantize with scale_dtype float16 (plan key \"scale_dtype\": "
                          "\"float16\") so that the file holds exactly the weights the model computes with")
    return kind


def quantized_blocks(m: PackedWeightModule, kind: str) -> tuple:
    """(uint8 [rows, k / 32 * block bytes] in ggml's layout, largest change of a weight)."""
    out_f, k = m.packed_weight.shape
    bits = 8 if kind == "Q8_0" else 4
    codes = ops.unpack(m.weight_packed.cpu(), bits, k).reshape(out_f, k // BLOCK, BLOCK)
    d = m.weight_scale.detach().cpu().float().reshape(out_f, -1).half()  # exact (checked)
    d_bytes = d.unsqueeze(-1).contiguous().view(torch.uint8)  # [out, blocks, 2]
    change = 0.0
    if kind == "Q8_0":
        q = (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
        blocks = torch.cat([d_bytes, q], dim=-1)
    else:
        nib = codes[..., :16] | (codes[..., 16:] << 4)  # element j low, j + 16 high
        if kind == "Q4_0":
            blocks = torch.cat([d_bytes, nib], dim=-1)
        else:
            z = m.float_zero_points().detach().cpu().reshape(out_f, -1)
            m_exact = -z * d.float()
            m16 = m_exact.half()
            change = float((m16.float() - m_exact).abs().max())
            blocks = torch.cat([d_bytes, m16.unsqueeze(-1).contiguous().view(torch.uint8), nib], dim=-1)
    return blocks.reshape(out_f, -1).numpy(), change


def check_convert_type(kind: Optional[str], k: int) -> None:
    """ExportError unless a row of ``k`` values can be converted to the GGUF type ``kind``."""
    if kind not in CONVERT_TYPES:
        raise ExportError(f"cannot convert to GGUF type {kind!r}; convertible: {', '.join(CONVERT_TYPES)}")
    if kind != "F16" and k % BLOCK:
        raise ExportError(f"rows of {k} values do not fill {kind} blocks of 32; convert to F16")


def converted_blocks(m: PackedWeightModule, kind: str) -> tuple:
    """(array for the file, {"rel_rms", "max_change"}): the layer's decoded weight quantized to
    ``kind`` by gguf-py (ggml's reference quantizer), with the change this makes to its weights."""
    import gguf

    w = m.dequantized_weight(torch.float32).cpu().numpy()
    check_convert_type(kind, w.shape[1])
    if kind == "F16":
        data = w.astype(np.float16)
        back = data.astype(np.float32)
    else:
        t = getattr(gguf.GGMLQuantizationType, kind)
        data = gguf.quants.quantize(w, t)
        back = gguf.quants.dequantize(data, t)
    diff = back - w
    norm = float(np.linalg.norm(w))
    return data, {"rel_rms": float(np.linalg.norm(diff)) / norm if norm > 0 else 0.0,
                  "max_change": float(np.abs(diff).max()) if diff.size else 0.0}


def _describe(m: PackedWeightModule) -> str:
    return f"{m.fmt}{'' if m.symmetric else ' asym'} group {m.group_size}"


def _permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head (convert_hf_to_gguf's permute)."""
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _pre_tokenizer(tok_dir: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (from tokenizer.json), 'default' if unknown."""
    try:
        with open(os.path.join(tok_dir, "tokenizer.json"), encoding="utf-8") as f:
            pre = json.load(f).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return "default"
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt-2"  # llama.cpp spells it with a hyphen
    return "default"


def to_gguf(model: nn.Module, tokenizer, path: str, float_type: str = "F32", convert: Optional[str] = None) -> dict:
    """Write ``model`` (a Llama-family causal LM whose linears are QuantLinear of a GGUF block type,
    or float) and its tokenizer as a GGUF file; atomic (a temporary file renamed). Returns a report
    {"tensors": {name: type}, "q4_1_min_change": largest change of a weight from rounding Q4_1's m,
    "converted": {name: {"from", "to", "rel_rms", "max_change"}}}.

    A quantized layer (or embedding) with no GGUF block type raises ExportError, unless ``convert``
    names a type of CONVERT_TYPES: it is then decoded and re-quantized to that type (its activation
    quantization, if any, is left to llama.cpp's own), and the added error is in the report."""
    import gguf

    cfg = model.config
    if getattr(cfg, "model_type", None) not in ("llama", "mistral") and "Llama" not in type(model).__name__:
        raise ExportError(f"GGUF export supports Llama-family models; got {type(model).__name__}")
    if getattr(model, "alphaquant_rotated", False):
        raise ExportError("a rotated model does not export to GGUF (llama.cpp has no online rotation of down_proj)")
    if float_type not in ("F32", "F16"):
        raise ExportError(f"float_type must be F32 or F16; got {float_type!r}")
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    if convert is not None and convert not in CONVERT_TYPES:
        raise ExportError(f"cannot convert to GGUF type {convert!r}; convertible: {', '.join(CONVERT_TYPES)}")
    plan = []  # (gguf name, array, raw type or None)
    report = {"tensors": {}, "q4_1_min_change": 0.0, "converted": {}}
    ftype = np.float32 if float_type == "F32" else np.float16

    def blocks(name: str, module: PackedWeightModule) -> tuple:
        """(array, gguf type name, raw type or None) of a quantized weight: its codes, or converted."""
        if getattr(module, "input_rotation", None) is not None:
            raise ExportError(f"{name}: a layer rotating its input online does not export to GGUF")
        try:
            kind = gguf_type(module)
        except ExportError as e:
            if convert is None:
                raise ExportError(f"{name}: {e}{CONVERT_HINT}") from None
            try:
                data, err = converted_blocks(module, convert)
            except ExportError as e2:
                raise ExportError(f"{name}: {e2}") from None
            report["converted"][name] = {"from": _describe(module), "to": convert, **err}
            return data, convert, None if convert == "F16" else getattr(gguf.GGMLQuantizationType, convert)
        data, change = quantized_blocks(module, kind)
        report["q4_1_min_change"] = max(report["q4_1_min_change"], change)
        return data, kind, getattr(gguf.GGMLQuantizationType, kind)

    def add_linear(name: str, module: nn.Module, heads: Optional[int]):
        if isinstance(module, QuantLinear):
            data, kind, raw = blocks(f"{name}.weight", module)
        else:
            data, kind, raw = module.weight.detach().float().numpy().astype(ftype), float_type, None
        if heads is not None:
            data = _permute_rows(data, heads)
        plan.append((f"{name}.weight", data, raw))
        report["tensors"][f"{name}.weight"] = kind
        if getattr(module, "bias", None) is not None:
            b = module.bias.detach().float().numpy()
            plan.append((f"{name}.bias", _permute_rows(b, heads) if heads is not None else b, None))

    emb = model.get_input_embeddings()
    if isinstance(emb, QuantEmbedding):  # llama.cpp reads token_embd in any block type
        data, kind, raw = blocks("token_embd.weight", emb)
        plan.append(("token_embd.weight", data, raw))
        report["tensors"]["token_embd.weight"] = kind
    else:
        plan.append(("token_embd.weight", emb.weight.detach().float().numpy().astype(ftype), None))
        report["tensors"]["token_embd.weight"] = float_type
    for i, layer in enumerate(model.model.layers):
        for hf, gg in _NAMES.items():
            module = layer.get_submodule(hf)
            if isinstance(module, (nn.Linear, QuantLinear)):
                heads = n_head if hf == "self_attn.q_proj" else n_kv if hf == "self_attn.k_proj" else None
                add_linear(f"blk.{i}.{gg}", module, heads)
            else:
                plan.append((f"blk.{i}.{gg}.weight", module.weight.detach().float().numpy(), None))
    plan.append(("output_norm.weight", model.model.norm.weight.detach().float().numpy(), None))
    if isinstance(model.lm_head, TiedQuantLinear) and model.lm_head.bias is not None:
        raise ExportError("an LM head with a bias has no GGUF tensor to hold it (llama's output has none)")
    tied = isinstance(model.lm_head, TiedQuantLinear) or (
        isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is emb.weight)
    if not tied:  # llama.cpp reuses token_embd when there is no output.weight
        add_linear("output", model.lm_head, None)

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".alphaquant-", suffix=".gguf.tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(getattr(cfg, "_name_or_path", "") or "alphaquant model")
        w.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
        rope = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
        w.add_rope_freq_base(float(rope or 10000.0))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        types = set(report["tensors"].values())
        w.add_file_type(next((getattr(gguf.LlamaFileType, f"MOSTLY_{t}") for t in ("Q4_1", "Q4_0", "Q5_1", "Q5_0")
                              if t in types), gguf.LlamaFileType.MOSTLY_Q8_0 if "Q8_0" in types
                             else gguf.LlamaFileType.MOSTLY_F16))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, tokenizer, cfg)
        for name, data, raw in plan:
            w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return report


def _bpe_vocab(tokenizer, folder: str):
    """gguf's BpeVocab of ``tokenizer`` saved in ``folder``, or ExportError (what GGUF export reads)."""
    import gguf
    from pathlib import Path

    if tokenizer is None:
        raise ExportError("GGUF export needs the tokenizer (llama.cpp reads it from the file)")
    tokenizer.save_pretrained(folder)
    try:
        return gguf.BpeVocab(Path(folder))
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"GGUF export supports byte-level BPE tokenizers (gpt2-style) so far: {e}") from None


def check_tokenizer(tokenizer) -> None:
    """ExportError unless ``tokenizer`` can be written into a GGUF file (checked before quantizing)."""
    with tempfile.TemporaryDirectory() as d:
        _bpe_vocab(tokenizer, d)


def _add_tokenizer(w, tokenizer, cfg) -> None:
    import gguf
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        vocab = _bpe_vocab(tokenizer, d)
        tokens, types = [], []
        for text, _score, toktype in vocab.all_tokens():
            tokens.append(text)
            types.append(toktype)
        n = cfg.vocab_size
        while len(tokens) < n:  # unused rows of the embedding
            tokens.append(f"[PAD{len(tokens)}]".encode())
            types.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_tokenizer(d))
        w.add_token_list(tokens[:n])
        w.add_token_types(types[:n])
        gguf.SpecialVocab(Path(d), load_merges=True, n_vocab=n).add_to_gguf(w)
