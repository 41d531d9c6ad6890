"""Streaming quantization: a sharded Hugging Face folder quantized one tensor at a time gives the
same checkpoint as the in-memory path, keeps source dtypes, writes shards with an index, refuses
damaged inputs, and never holds the whole model in memory."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from alphaquant.nn import QuantEmbedding, TiedQuantLinear
from alphaquant.plans import apply_plan
from alphaquant.sharded_safetensors import INDEX
from alphaquant.streaming import StreamingError, stream_quantize

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLAN = {"default": {"wq": "int4", "symmetric": False, "group_size": 32, "zero_opt": True, "scale_dtype": "float16",
                    "dtype": "float32"},
        "overrides": [{"pattern": "model.layers.1.mlp.*", "wq": "fp8_e4m3", "granularity": "per_channel", "zero_opt": False},
                      {"pattern": "model.layers.0.self_attn.v_proj", "wq": "lut4", "codebook_granularity": "per_channel",
                       "zero_opt": False, "symmetric": True},
                      {"pattern": "model.layers.0.mlp.*", "zero_point": "byte", "group_size": 36},
                      {"pattern": "model.embed_tokens", "wq": "int8", "group_size": 64}]}


def sharded_llama(path, tied=True):
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                   architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="40KB")
    return str(path)


def load(path):
    from alphaquant.cli.checkpoint_folder import load_checkpoint

    model, _ = load_checkpoint(str(path)) if os.path.exists(os.path.join(path, "tokenizer.json")) else (None, None)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_streaming_gives_the_in_memory_checkpoint(tmp_path, tied):
    from alphaquant.checkpoint_file import load_quantized
    from alphaquant.sharded_safetensors import ShardedReader

    src = sharded_llama(tmp_path / "src", tied)
    assert os.path.isfile(os.path.join(src, INDEX))  # the input is really sharded
    report = stream_quantize(src, PLAN, str(tmp_path / "out"), max_shard_bytes=30_000)
    assert report["streamed"] and report["bytes_read"] > 0 and report["read_gb_per_s"] > 0
    out = ShardedReader(str(tmp_path / "out"))
    assert len(out.shards) > 1 and os.path.isfile(tmp_path / "out" / INDEX)
    assert out.tensors["model.norm.weight"][0] == "BF16"  # float tensors keep the source dtype
    assert out.tensors["model.layers.0.mlp.up_proj.weight_zero_point"][0] == "U8"  # one-byte zero points
    assert out.tensors["model.layers.1.self_attn.q_proj.weight_zero_point"][0] == "F16"
    assert ("lm_head.weight_packed" in out.tensors) == (not tied)  # tied: the head uses the embedding's table

    ref = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    apply_plan(ref, PLAN)
    ours = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(tmp_path / "out")).eval()
    load_quantized(ours, str(tmp_path / "out"))
    assert isinstance(ours.model.embed_tokens, QuantEmbedding)
    assert isinstance(ours.lm_head, TiedQuantLinear) == tied
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert ref_state.keys() == our_state.keys()
    for k, v in ref_state.items():
        assert torch.equal(v, our_state[k].to(v.dtype)), k  # the same codes, scales and floats
    ids = torch.randint(0, 200, (1, 11))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, ours(ids).logits)
    layers = {r["name"]: r for r in report["layers"]}
    assert layers["model.layers.0.self_attn.q_proj"]["sqnr_db"] > 10


def test_float_dtype_converts_what_is_not_quantized(tmp_path):
    from alphaquant.sharded_safetensors import ShardedReader

    src = sharded_llama(tmp_path / "src")
    stream_quantize(src, {"default": {"wq": "int8"}}, str(tmp_path / "out"), float_dtype=torch.float16)
    out = ShardedReader(str(tmp_path / "out"))
    assert out.tensors["model.norm.weight"][0] == "F16" and out.tensors["model.embed_tokens.weight"][0] == "F16"
    assert out.tensors["model.layers.0.mlp.up_proj.weight_packed"][0] == "U8"


def test_plans_that_need_activations_or_the_whole_model_are_refused(tmp_path):
    src = sharded_llama(tmp_path / "src")
    for plan, why in (({"default": {"wq": "int4", "algorithm": "gptq"}}, "gptq calibrates on activations"),
                      ({"default": {"wq": "int8", "aq": "int8", "act_static": True}}, "act_static"),
                      ({"default": {"wq": "int4"}, "rotation": "hadamard"}, "rotated"),
                      ({"default": {"wq": "int4"}, "finetune": {}}, "finetune")):
        with pytest.raises(StreamingError, match=why):
            stream_quantize(src, plan, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_damaged_inputs_are_refused_and_nothing_is_written(tmp_path):
    src = sharded_llama(tmp_path / "src")
    with open(os.path.join(src, INDEX)) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    cases = {}
    missing = shutil.copytree(src, tmp_path / "missing")
    os.remove(missing / shards[1])
    cases[missing] = f"shard {shards[1]} listed in {INDEX} is missing"
    truncated = shutil.copytree(src, tmp_path / "truncated")
    with open(truncated / shards[0], "r+b") as f:
        f.truncate(os.path.getsize(truncated / shards[0]) - 10)
    cases[truncated] = "truncated or corrupted"
    twice = shutil.copytree(src, tmp_path / "twice")
    from alphaquant.sharded_safetensors import ShardWriter

    w = ShardWriter(str(twice / "extra.safetensors"), [("model.norm.weight", "BF16", (64,))])
    w.write("model.norm.weight", torch.ones(64, dtype=torch.bfloat16))
    w.close()
    idx = json.loads((twice / INDEX).read_text())
    idx["weight_map"]["model.layers.0.input_layernorm.weight"] = "extra.safetensors"
    (twice / INDEX).write_text(json.dumps(idx))
    cases[twice] = "tensor 'model.norm.weight' is in two shards"
    absent = shutil.copytree(src, tmp_path / "absent")
    idx = json.loads((absent / INDEX).read_text())
    name = next(n for n in idx["weight_map"] if "down_proj" in n)
    del idx["weight_map"][name]
    (absent / INDEX).write_text(json.dumps(idx))
    cases[absent] = "shards hold tensors"
    for path, match in cases.items():
        with pytest.raises(ValueError, match=match):
            stream_quantize(str(path), {"default": {"wq": "int4"}}, str(tmp_path / "out"))
        assert not os.path.exists(tmp_path / "out")
    nan = shutil.copytree(src, tmp_path / "nan")
    from safetensors.torch import load_file, save_file

    shard = next(s for s in shards if "down_proj" in json.dumps([k for k, v in index["weight_map"].items()
                                                                  if v == s]))
    state = load_file(nan / shard)
    key = next(k for k in state if "down_proj" in k)
    state[key][0, 0] = float("nan")
    save_file(state, nan / shard, metadata={"format": "pt"})
    with pytest.raises(StreamingError, match=f"{key} holds NaN or Inf"):
        stream_quantize(str(nan), {"default": {"wq": "int4"}}, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("scheme", [{"wq": "int4", "symmetric": False, "group_size": 64, "zero_opt": True},
                                    {"wq": "int3", "symmetric": False, "group_size": 32, "clip_search": True},
                                    {"wq": "fp8_e4m3", "granularity": "per_channel"},
                                    {"wq": "nf4", "group_size": 64}, {"wq": "int8", "granularity": "per_tensor"},
                                    {"wq": "lut4", "group_size": 64},
                                    {"wq": "int4", "symmetric": False, "group_size": 128},  # bf16 read by the kernel
                                    {"wq": "int4", "symmetric": False, "group_size": 64, "scale_dtype": "float32"},
                                    {"wq": "int4", "symmetric": False, "group_size": 64, "zero_point": "integer"},
                                    {"wq": "int4", "symmetric": False, "group_size": 36, "zero_opt": True,
                                     "zero_point": "byte"}])
def test_quantizing_by_blocks_of_rows_gives_the_codes_of_the_whole_tensor(scheme):
    from alphaquant.plans import DEFAULTS, build_quantizers
    from alphaquant.streaming import quantize_by_rows

    wq, _ = build_quantizers({**DEFAULTS, "scale_dtype": "float16", **scheme})
    w = (torch.randn(3000, 96, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    whole = wq.quantize_weight(w.float())
    rows = quantize_by_rows(wq, w, chunk_bytes=96 * 4 * 1400)  # 1365-row blocks of zero_opt: 3 chunks
    for a, b in ((whole.data, rows.data), (whole.scale, rows.scale), (whole.zero_point, rows.zero_point),
                 (whole.codebook, rows.codebook)):
        assert (a is None and b is None) or torch.equal(a, b)


MEMORY_PROBE = r"""
import resource, sys, torch
from alphaquant.streaming import meta_model, stream_quantize
from alphaquant import ops
ops.quantize(torch.randn(64, 256), "int4", symmetric=False, group_size=128)  # kernels loaded, pools warm
meta_model(sys.argv[1])  # transformers' model code imported: a fixed cost, not the model's size
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
stream_quantize(sys.argv[1], {"default": {"wq": "int4", "group_size": 128, "symmetric": False,
                                          "scale_dtype": "float16"}}, sys.argv[2])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(before, after)
"""


def test_streaming_memory_grows_with_the_largest_tensor_not_the_model(tmp_path):
    src = tmp_path / "synthetic"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_synthetic_llama.py"), str(src), "--gb", "0.3",
                    "--hidden", "1024", "--intermediate", "2816", "--vocab", "4096", "--heads", "16",
                    "--kv-heads", "8", "--shard-gb", "0.1"], check=True, capture_output=True)
    model_bytes = sum(os.path.getsize(src / f) for f in os.listdir(src) if f.endswith(".safetensors"))
    largest = 4096 * 1024 * 4  # the embedding / lm_head, in the float32 it is quantized in
    res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(src), str(tmp_path / "out")], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    before, after = map(int, res.stdout.split()[-2:])
    growth = after - before
    print(f"model {model_bytes / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB, peak growth {growth / 1e6:.0f} MB")
    assert model_bytes > 250e6
    assert growth < 5 * largest and growth < 0.3 * model_bytes


def test_sharded_reader_reads_into_a_tensor_and_refuses_a_wrong_one(tmp_path):
    from safetensors.torch import save_file

    from alphaquant.sharded_safetensors import ShardedReader

    w = torch.randn(300, 70).to(torch.bfloat16)
    save_file({"w": w, "e": torch.zeros(0)}, str(tmp_path / "model.safetensors"))
    r = ShardedReader(str(tmp_path))
    try:
        assert torch.equal(r.get("w"), w) and r.get("e").numel() == 0
        out = torch.empty(300, 70, dtype=torch.bfloat16)
        assert r.get("w", out=out) is out and torch.equal(out, w)
        for bad in (torch.empty(300, 70), torch.empty(70, 300, dtype=torch.bfloat16),
                    torch.empty(70, 300, dtype=torch.bfloat16).t()):
            with pytest.raises(ValueError, match="cannot read w"):
                r.get("w", out=bad)
    finally:
        r.close()


def test_mapped_tensors_are_the_file_bytes_and_never_write_to_it(tmp_path):
    from alphaquant.sharded_safetensors import ShardedReader, ShardWriter

    w, odd = torch.randn(300, 70).to(torch.bfloat16), torch.arange(5, dtype=torch.uint8)
    w2 = torch.randn(3, 3).to(torch.bfloat16)
    path = str(tmp_path / "model.safetensors")
    tensors = {"w": w, "a_odd": odd, "w2": w2, "e": torch.zeros(0)}  # in file order: w2 starts at an odd byte
    writer = ShardWriter(path, [("w", "BF16", (300, 70)), ("a_odd", "U8", (5,)), ("w2", "BF16", (3, 3)),
                                ("e", "F32", (0,))])
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    before = open(path, "rb").read()
    r = ShardedReader(str(tmp_path))
    try:
        r.prefetch("w")
        for name, want in tensors.items():
            with r.mapped(name) as t:
                assert t.dtype == want.dtype and torch.equal(t, want)
                t.fill_(1)  # copy-on-write (or a copy): the file is untouched
        with r.mapped("w") as t:
            kept = t[:2]  # a view that outlives the block keeps its pages, and stays right
        assert torch.equal(kept, w[:2])
        del kept
        assert open(path, "rb").read() == before
    finally:
        r.close()
    truncated = tmp_path / "t"
    truncated.mkdir()
    (truncated / "model.safetensors").write_bytes(before[:-100])
    with pytest.raises(ValueError, match="truncated"):
        ShardedReader(str(truncated))


def test_a_failed_background_write_is_raised_and_the_producer_stops(tmp_path):
    from alphaquant.sharded_safetensors import write_sharded

    entries = [("a", "F32", (4,)), ("b", "F32", (4,)), ("c", "F32", (4,))]
    made = []

    def produce():
        for name, shape in (("a", (4,)), ("b", (5,)), ("c", (4,))):  # b has the wrong shape
            made.append(name)
            yield name, torch.zeros(shape)

    with pytest.raises(ValueError, match="expected b F32 \\[4\\] next"):
        write_sharded(str(tmp_path), entries, produce(), None, 1 << 20)
    assert made == ["a", "b", "c"] or made == ["a", "b"]  # at most one tensor past the failed write

    def failing():
        yield "a", torch.zeros(4)
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        write_sharded(str(tmp_path), entries, failing(), None, 1 << 20)


def test_heap_bound_is_set_on_glibc():
    from alphaquant.utils.heap import bound_heap_growth

    got = bound_heap_growth()
    if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION"):
        assert got is True
