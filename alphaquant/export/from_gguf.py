"""Import a Llama-family GGUF file whose linears are Q8_0 / Q4_0 / Q4_1 as QuantLinear layers built
from the stored codes (the inverse of gguf_file.py): Q8_0 -> int8 symmetric group 32 (code = q +
128), Q4_0 -> int4 symmetric group 32 (code = q), Q4_1 -> int4 asymmetric group 32 with scale d and
zero point -m / d (float32: value (q - z) * d equals q * d + m to float32 rounding). q/k rows are
permuted back from llama.cpp's rotary layout. A Q8_0/Q4_0/Q4_1 ``token_embd`` becomes a
QuantEmbedding from its codes (and the head tied to it, without ``output.weight``, a
TiedQuantLinear). Norms and F16/BF16/F32 tensors are decoded to float by the gguf package; other
block types (the K-quants, IQ types, ...) are decoded to float with a warning, or refused
(``unsupported="refuse"``), as the caller chooses.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from .. import ops
from ..nn.quant_embedding import QuantEmbedding, TiedQuantLinear
from ..nn.quant_linear import QuantLinear
from ..packed import PackedTensor
from .compressed_tensors import ExportError
from .gguf_file import BLOCK

_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
FROM_CODES = ("Q8_0", "Q4_0", "Q4_1")  # block types held as our codes
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
UNSUPPORTED_CHOICES = ("dequantize", "refuse")


class UnsupportedGGUFTypeWarning(UserWarning):
    """GGUF tensors of block types we do not hold as codes were decoded to float."""


def _unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    out = rows.shape[0]
    return rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


def packed_from_blocks(blocks: np.ndarray, kind: str, k: int) -> PackedTensor:
    """uint8 [rows, k / 32 * block bytes] of Q8_0 / Q4_0 / Q4_1 -> our PackedTensor (codes copied)."""
    rows = blocks.shape[0]
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    b = torch.from_numpy(np.ascontiguousarray(blocks)).reshape(rows, k // BLOCK, size)
    d = b[..., :2].contiguous().view(torch.float16).float().reshape(rows, -1)
    if kind == "Q8_0":
        codes = (b[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return PackedTensor(ops.pack(codes.reshape(rows, k), 8), d, None, "int8", True, BLOCK, (rows, k))
    nib = b[..., 4:] if kind == "Q4_1" else b[..., 2:]
    codes = torch.cat([nib & 0xF, nib >> 4], dim=-1).reshape(rows, k)  # element j low nibble, j + 16 high
    packed = ops.pack(codes.contiguous(), 4)
    if kind == "Q4_0":
        return PackedTensor(packed, d, None, "int4", True, BLOCK, (rows, k))
    m = b[..., 2:4].contiguous().view(torch.float16).float().reshape(rows, -1)
    zero = torch.where(d != 0, -m / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    # a block whose d is 0 holds m everywhere: it has no int4 form with our (q - z) * s
    if bool((d == 0).any() & (m != 0).any()) or not bool((d > 0).all()):
        raise ExportError(f"a Q4_1 block has a scale d <= 0 (d = {float(d.min())}); it has no (q - z) * s form")
    return PackedTensor(packed, d, zero, "int4", False, BLOCK, (rows, k))


def load_gguf(path: str, dtype: torch.dtype = torch.float32, unsupported: str = "dequantize"):
    """(model, tokenizer) from a Llama-family GGUF file; Q8_0/Q4_0/Q4_1 linears and embeddings stay
    packed. Tensors of other quantized block types (Q4_K, Q6_K, IQ4_XS, ...) are decoded to float
    with an UnsupportedGGUFTypeWarning (``unsupported="dequantize"``) or refused with ExportError
    before the model is built (``"refuse"``)."""
    import gguf
    import transformers

    if unsupported not in UNSUPPORTED_CHOICES:
        raise ValueError(f"unsupported must be one of {UNSUPPORTED_CHOICES}; got {unsupported!r}")
    folder, name = os.path.split(os.path.abspath(path))
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    if config.model_type not in ("llama", "mistral"):
        raise ExportError(f"GGUF import supports Llama-family files; {path} is {config.model_type}")
    config.architectures = config.architectures or ["LlamaForCausalLM"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    others = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in FROM_CODES + FLOAT_TYPES:
            others.setdefault(kind, []).append(t.name)
    if others:
        found = "; ".join(f"{k}: {len(v)} tensors ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                          for k, v in sorted(others.items()))
        if unsupported == "refuse":
            raise ExportError(f"GGUF file {path} holds block types AlphaQuant does not keep as codes: {found}; "
                              f"held from their codes: {', '.join(FROM_CODES)} (float: {', '.join(FLOAT_TYPES)}); "
                              f"allow decoding them to float to load it anyway")
        warnings.warn(f"GGUF file {path}: {found} decoded to float (AlphaQuant keeps {', '.join(FROM_CODES)} as "
                      f"codes): those layers compute in float and take float memory", UnsupportedGGUFTypeWarning,
                      stacklevel=2)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads

    def dense(t) -> torch.Tensor:
        d = gguf.quants.dequantize(t.data, t.tensor_type)  # F32 tensors come back as read-only file views
        return torch.from_numpy(np.array(d, copy=not d.flags.writeable)).to(dtype)

    state = {"model.norm.weight": dense(tensors["output_norm.weight"])}
    emb = tensors["token_embd.weight"]
    quant_emb = None
    if emb.tensor_type.name in FROM_CODES and config.hidden_size % BLOCK == 0:
        shell = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        quant_emb = QuantEmbedding.from_packed(shell, packed_from_blocks(emb.data, emb.tensor_type.name,
                                                                         config.hidden_size))
        model.model.embed_tokens = quant_emb
    else:
        state["model.embed_tokens.weight"] = dense(emb)
    for i in range(config.num_hidden_layers):
        for gg, hf in _NORMS.items():
            state[f"model.layers.{i}.{hf}.weight"] = dense(tensors[f"blk.{i}.{gg}.weight"])
    linears = {f"blk.{i}.{gg}": f"model.layers.{i}.{hf}" for i in range(config.num_hidden_layers)
               for gg, hf in _LINEARS.items()}
    if "output.weight" in tensors:
        linears["output"] = "lm_head"
    for gg, hf in linears.items():
        t = tensors.get(f"{gg}.weight")
        if t is None:
            raise ExportError(f"GGUF file {path} has no tensor {gg}.weight")
        heads = n_head if gg.endswith("attn_q") else n_kv if gg.endswith("attn_k") else None
        kind = t.tensor_type.name
        shell = model.get_submodule(hf)
        bias = tensors.get(f"{gg}.bias")
        if kind in ("Q8_0", "Q4_0", "Q4_1") and shell.in_features % BLOCK == 0:
            blocks = t.data if heads is None else _unpermute(t.data, heads)
            packed = packed_from_blocks(blocks, kind, shell.in_features)
            linear = nn.Linear(shell.in_features, shell.out_features, bias=bias is not None, dtype=dtype)
            q = QuantLinear.from_packed(linear, packed)
            if bias is not None:
                b = dense(bias).numpy()
                q.bias.copy_(torch.from_numpy(b if heads is None else _unpermute(b, heads)))
            parent, _, child = hf.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, q)
        else:  # other types: decoded to float
            w = dense(t).numpy()
            state[f"{hf}.weight"] = torch.from_numpy(w if heads is None else _unpermute(w, heads))
            if bias is not None:
                state[f"{hf}.bias"] = dense(bias)
    model.load_state_dict(state, strict=False, assign=True)
    if "output.weight" not in tensors:  # tied, as llama.cpp reads the file
        if quant_emb is not None:
            model.lm_head = TiedQuantLinear(quant_emb, tied_to="model.embed_tokens")
        else:
            model.lm_head.weight = model.model.embed_tokens.weight
    for n, m in list(model.named_modules()):  # computed buffers (inv_freq): rebuilt on the CPU
        if n.endswith("rotary_emb"):
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, type(m)(config=config))
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if left:
        raise ExportError(f"GGUF file {path}: tensors missing for {left[:5]}")
    return model.eval(), tokenizer
