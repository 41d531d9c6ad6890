"""Write a Llama-shaped checkpoint of random bf16 weights as Hugging Face safetensors shards,
one tensor at a time (memory: one tensor), for the scale benchmark and the streaming tests.

Usage: python scripts/make_synthetic_llama.py OUT_DIR [--gb 8] [--hidden 4096] [--intermediate 11008]
       [--vocab 32000] [--layers N] [--shard-gb 2]
--layers defaults to what makes the checkpoint about --gb gigabytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from alphaquant.sharded_safetensors import split_into_shards, shard_name, ShardWriter, write_index  # noqa: E402


def layer_tensors(i: int, h: int, inter: int, kv: int) -> list:
    p = f"model.layers.{i}."
    return [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)), (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--gb", type=float, default=8.0)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    h, inter, kv = a.hidden, a.intermediate, a.hidden // a.heads * a.kv_heads
    per_layer = 2 * (2 * h * h + 2 * kv * h + 3 * inter * h + 2 * h)
    fixed = 2 * (2 * a.vocab * h + h)
    layers = a.layers or max(1, round((a.gb * 1e9 - fixed) / per_layer))
    names = [("model.embed_tokens.weight", (a.vocab, h))]
    for i in range(layers):
        names += layer_tensors(i, h, inter, kv)
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (a.vocab, h))]
    entries = [(n, "BF16", s) for n, s in names]
    os.makedirs(a.out, exist_ok=True)
    shards = split_into_shards(entries, int(a.shard_gb * 1e9))
    gen = torch.Generator().manual_seed(a.seed)
    for i, part in enumerate(shards):
        w = ShardWriter(os.path.join(a.out, shard_name(i, len(shards))), part, {"format": "pt"})
        for name, _, shape in part:
            if name.endswith("norm.weight"):
                t = 1 + 0.1 * torch.randn(shape, generator=gen)
            else:
                t = torch.randn(shape, generator=gen) * (1.0 / shape[-1] ** 0.5)
            w.write(name, t.to(torch.bfloat16))
        w.close()
    if len(shards) > 1:
        write_index(a.out, shards)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": a.heads,
              "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    total = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(f"wrote {a.out}: {layers} layers, {len(shards)} shards, {total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
