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
            (m.weight_zero_point.float() * s).half().float()).all()):
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
            z = m.weight_zero_point.detach().cpu().float().reshape(out_f, -1)
            m_exact = -z * d.float()
            m16 = m_exact.half()
            change = float((m16.float() - m_exact).abs().max())
            blocks = torch.cat([d_bytes, m16.unsqueeze(-1).contiguous().view(torch.uint8), nib], dim=-1)
    return blocks.reshape(out_f, -1).numpy(), change


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


def to_gguf(model: nn.Module, tokenizer, path: str, float_type: str = "F32") -> dict:
    """Write ``model`` (a Llama-family causal LM whose linears are QuantLinear of a GGUF block type,
    or float) and its tokenizer as a GGUF file; atomic (a temporary file renamed). Returns a report
    {"tensors": {name: type}, "q4_1_min_change": largest change of a weight from rounding Q4_1's m}."""
    import gguf

    cfg = model.config
    if getattr(cfg, "model_type", None) not in ("llama", "mistral") and "Llama" not in type(model).__name__:
        raise ExportError(f"GGUF export supports Llama-family models; got {type(model).__name__}")
    if getattr(model, "alphaquant_rotated", False):
        raise ExportError("a rotated model does not export to GGUF (llama.cpp has no online rotation of down_proj)")
    if float_type not in ("F32", "F16"):
        raise ExportError(f"float_type must be F32 or F16; got {float_type!r}")
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    plan = []  # (gguf name, array, raw type or None)
    report = {"tensors": {}, "q4_1_min_change": 0.0}
    ftype = np.float32 if float_type == "F32" else np.float16

    def add_linear(name: str, module: nn.Module, heads: Optional[int]):
        if isinstance(module, QuantLinear):
            kind = gguf_type(module)
            data, change = quantized_blocks(module, kind)
            report["q4_1_min_change"] = max(report["q4_1_min_change"], change)
            raw = getattr(gguf.GGMLQuantizationType, kind)
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
        kind = gguf_type(emb)
        data, change = quantized_blocks(emb, kind)
        report["q4_1_min_change"] = max(report["q4_1_min_change"], change)
        plan.append(("token_embd.weight", data, getattr(gguf.GGMLQuantizationType, kind)))
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
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if "Q4_1" in report["tensors"].values() else
                        gguf.LlamaFileType.MOSTLY_Q4_0 if "Q4_0" in report["tensors"].values() else
                        gguf.LlamaFileType.MOSTLY_Q8_0)
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


def _add_tokenizer(w, tokenizer, cfg) -> None:
    import gguf
    from pathlib import Path

    if tokenizer is None:
        raise ExportError("GGUF export needs the tokenizer (llama.cpp reads it from the file)")
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        try:
            vocab = gguf.BpeVocab(Path(d))
        except (FileNotFoundError, ValueError) as e:
            raise ExportError(f"GGUF export supports byte-level BPE tokenizers (gpt2-style) so far: {e}") from None
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
