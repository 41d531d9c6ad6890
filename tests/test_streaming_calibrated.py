"""Calibrated plans (GPTQ, AWQ, SmoothQuant) run one block in memory at a time from disk: the same
checkpoint as the in-memory pipeline, bit for bit, at the memory of one block."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_llama import save_tiny_llama

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def _tensors(folder):
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("preset", ["gptq_w4_g64", "awq_w4_g64", "w8a8_smoothquant"])
def test_blockwise_from_disk_gives_the_in_memory_checkpoint(tiny, tmp_path, preset, capsys):
    from alphaquant.cli import main

    common = ["quantize", tiny, "--plan", preset, "--no-eval", "--calib-tokens", "1024"]
    assert main(common + ["--out", str(tmp_path / "s")]) == 0
    assert "one block in memory at a time" in capsys.readouterr().out
    assert main(common + ["--out", str(tmp_path / "m"), "--in-memory"]) == 0
    (streamed, meta_s), (in_memory, meta_m) = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert streamed.keys() == in_memory.keys() and meta_s == meta_m
    for k in streamed:
        assert streamed[k].dtype == in_memory[k].dtype and torch.equal(streamed[k], in_memory[k]), k


def test_plans_that_cannot_run_block_by_block_say_why(tiny, tmp_path):
    from alphaquant.streaming import StreamingError
    from alphaquant.streaming_calibrated import stream_quantize_calibrated

    for plan, why in (({"default": {"wq": "int8", "aq": "int8", "act_static": True}}, "act_static"),
                      ({"rotation": "hadamard", "default": {"wq": "int4", "algorithm": "gptq"}}, "rotated"),
                      ({"finetune": {}, "default": {"wq": "int4", "algorithm": "gptq"}}, "finetune")):
        with pytest.raises(StreamingError, match=why):
            stream_quantize_calibrated(tiny, plan, str(tmp_path / "o"), [torch.zeros(1, 8, dtype=torch.long)])
        assert not os.path.exists(tmp_path / "o")


def test_a_nan_weight_met_on_the_way_fails_and_leaves_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    from alphaquant.streaming import StreamingError
    from alphaquant.streaming_calibrated import stream_quantize_calibrated

    src = save_tiny_llama(tmp_path / "m")
    path = os.path.join(src, "model.safetensors")
    state = load_file(path)
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    ids = [torch.randint(0, 400, (1, 64)) for _ in range(4)]
    with pytest.raises(StreamingError, match="model.layers.1.mlp.up_proj.weight holds NaN"):
        stream_quantize_calibrated(src, {"default": {"wq": "int4", "algorithm": "gptq"}},
                                   str(tmp_path / "o"), ids)
    assert not os.path.exists(tmp_path / "o")


MEMORY_PROBE = r"""
import resource, sys, torch
from alphaquant.streaming import meta_model
from alphaquant.streaming_calibrated import stream_quantize_calibrated
from alphaquant import ops
ops.quantize(torch.randn(64, 256), "int4", symmetric=False, group_size=128)  # kernels loaded
meta_model(sys.argv[1])  # transformers' model code imported: a fixed cost
g = torch.Generator().manual_seed(0)
ids = [torch.randint(0, 2048, (1, 256), generator=g) for _ in range(8)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
stream_quantize_calibrated(sys.argv[1], {"default": {"wq": "int4", "group_size": 128, "symmetric": False,
                                                     "algorithm": "gptq", "scale_dtype": "float16"}}, sys.argv[2], ids)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(before, after)
"""


def test_blockwise_memory_is_one_block_not_the_model(tmp_path):
    src = tmp_path / "synthetic"
    # many small layers: the model is large against what one block's calibration and GPTQ hold
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_synthetic_llama.py"), str(src), "--gb", "0.2",
                    "--hidden", "512", "--intermediate", "1024", "--vocab", "2048", "--heads", "8",
                    "--kv-heads", "4", "--shard-gb", "0.1"], check=True, capture_output=True)
    config = json.load(open(src / "config.json"))
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    block = 4 * (h * h * 2 + h * h // 2 * 2 + 3 * h * i)  # float32 bytes of one decoder layer
    model_fp32 = 2 * sum(os.path.getsize(src / f) for f in os.listdir(src) if f.endswith(".safetensors"))
    res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(src), str(tmp_path / "out")], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    before, after = map(int, res.stdout.split()[-2:])
    growth = after - before
    print(f"{layers} layers, float32 model {model_fp32 / 1e6:.0f} MB, one block {block / 1e6:.0f} MB, "
          f"peak growth {growth / 1e6:.0f} MB")
    assert layers >= 20
    assert growth < 0.6 * model_fp32  # the in-memory path holds the whole float32 model, and these transients
