"""NVFP4Quantizer, its config, plans, QuantLinear/QuantEmbedding, save/load and the command line."""
import json
import os

import pytest
import torch
from torch import nn

from alphaquant import ops
from alphaquant.plans import PlanError, apply_plan
from alphaquant.quantizers import MinMaxObserver, NVFP4Config, NVFP4Quantizer
from alphaquant.quantizers.registry import create_quantizer_from_scheme


def test_seed_style_quantizer_stores_4_5_bits_per_value():
    q = NVFP4Quantizer(NVFP4Config())
    assert q.fmt == "nvfp4"
    w = torch.randn(48, 256)
    packed = q.quantize_weight(w)
    assert packed.scale.dtype == torch.uint8 and packed.zero_point.shape == (1,)
    assert (packed.nbytes - 4) * 8 / w.numel() == 4.5  # codes, one E4M3 byte per 16, one float32 per tensor
    p, s, g = ops.quantize(w, "nvfp4", group_size=16)
    assert torch.equal(packed.data, p) and torch.equal(packed.scale, s) and torch.equal(packed.zero_point, g)
    want = ops.dequantize(p, s, g, "nvfp4", group_size=16, k=256)
    assert torch.equal(q.dequantize(packed).float(), want.to(q.config.torch_dtype).float())
    shared = q.quantize_weight(w, global_scale=torch.tensor(7.0))  # a global scale chosen for several weights
    assert shared.zero_point.item() == 7.0
    odd = q.quantize_weight(torch.randn(5, 45))  # a short last block
    assert odd.scale.shape == (5, 3)
    x = torch.randn(4, 64)
    assert torch.equal(q.quantize_activation(x).float(),
                       ops.fake_quantize(x, "nvfp4", group_size=16).to(q.config.torch_dtype).float())


def test_config_refuses_what_nvfp4_fixes():
    with pytest.raises(ValueError, match="block of 16 values: group_size must be 16"):
        NVFP4Config(group_size=32)
    with pytest.raises(ValueError, match="granularity per_group"):
        NVFP4Config(granularity="per_channel")
    with pytest.raises(ValueError, match="clip_search and zero_opt do not apply"):
        NVFP4Config(clip_search=True)
    with pytest.raises(ValueError, match="E4M3 bytes"):
        NVFP4Config(scale_dtype="float16")
    q = NVFP4Quantizer()
    with pytest.raises(ValueError, match="takes no observer"):
        q.attach_observer(MinMaxObserver())
    with pytest.raises(ValueError, match="global_scale must be one finite value > 0"):
        q.quantize_weight(torch.randn(4, 32), global_scale=torch.tensor(0.0))
    (wq, wcfg), _ = create_quantizer_from_scheme({"wq": "nvfp4", "aq": None}, dtype="float32")
    assert wq(wcfg()).fmt == "nvfp4"


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 40))


def test_plans_save_and_load_nvfp4_layers_without_float_weights(tmp_path):
    from alphaquant.checkpoint_file import load_quantized, save_quantized

    plan = {"default": {"wq": "nvfp4", "aq": "nvfp4", "dtype": "float32"},
            "overrides": [{"pattern": "2", "aq": "none"}]}
    model = _mlp()
    x = torch.randn(3, 96)
    ref = model(x)
    report = apply_plan(model, plan)
    assert [r.bits_per_weight for r in report.layers][0] == pytest.approx(4.5 + 32 / (96 * 64))
    got = model(x)
    assert 0 < float((got - ref).norm() / ref.norm()) < 0.3
    path = str(tmp_path / "m.safetensors")
    save_quantized(model, path, plan)
    state = model.state_dict()
    assert all(v.dtype == torch.uint8 for k, v in state.items() if k.endswith(("weight_packed", "weight_scale")))
    assert all(v.shape == (1,) for k, v in state.items() if k.endswith("weight_zero_point"))  # the global scales
    fresh = _mlp()
    load_quantized(fresh, path)
    assert torch.equal(fresh(x), got)
    with pytest.raises(PlanError, match="block of 16 values"):
        apply_plan(_mlp(), {"default": {"wq": "nvfp4", "group_size": 32}})


@pytest.mark.parametrize("byte", [0x7F, 0x00, 0xB8])  # E4M3 NaN, zero, a negative scale
def test_a_bad_scale_byte_or_global_scale_in_a_checkpoint_is_refused(tmp_path, byte):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from alphaquant.checkpoint_file import load_quantized, save_quantized

    plan = {"default": {"wq": "nvfp4", "dtype": "float32"}}
    model = _mlp()
    apply_plan(model, plan)
    path = str(tmp_path / "m.safetensors")
    save_quantized(model, path, plan)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["0.weight_scale"][0, 0] = byte
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="scale"):
        load_quantized(_mlp(), path)
    tensors = load_file(path)
    tensors["0.weight_scale"][0, 0] = 0x38
    tensors["2.weight_zero_point"][0] = -1.0
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="scale"):
        load_quantized(_mlp(), path)


def test_embedding_through_a_plan():
    emb = nn.Sequential(nn.Embedding(50, 48))
    ref = emb[0].weight.detach().clone()
    apply_plan(emb, {"default": {"wq": "none"}, "overrides": [{"pattern": "0", "wq": "nvfp4", "dtype": "float32"}]})
    idx = torch.tensor([[3, 49, 0]])
    p, s, g = ops.quantize(ref, "nvfp4", group_size=16)
    assert torch.equal(emb(idx), ops.dequantize(p, s, g, "nvfp4", group_size=16, k=48)[idx])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tiny_llama import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_nvfp4"))


def test_cli_preset(tiny_model_dir, tmp_path):
    from alphaquant.cli.checkpoint_folder import load_checkpoint
    from alphaquant.cli.main import main

    out = str(tmp_path / "nvfp4")
    assert main(["quantize", tiny_model_dir, "--plan", "nvfp4", "--out", out, "--no-eval"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert all(4.5 <= r["bits_per_weight"] < 4.6 for r in report["layers"])
    model, tok = load_checkpoint(out)
    with torch.no_grad():
        logits = model(tok("the", return_tensors="pt")["input_ids"]).logits
    assert torch.isfinite(logits).all()


def test_fused_siblings_share_one_global_scale_in_memory_and_streaming(tiny_model_dir, tmp_path):
    """q/k/v and gate/up (one matrix each in vLLM, with one global scale) get the global scale of
    their largest weight; o_proj and down_proj keep their own. Streaming gives the same bytes."""
    from safetensors.torch import load_file

    from alphaquant.cli.presets import resolve_plan
    from alphaquant.quantizers.nvfp4 import global_scale_for
    from alphaquant.streaming import stream_quantize

    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    float_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    plan = resolve_plan("nvfp4")[1]
    apply_plan(model, plan)
    layer = "model.layers.1"
    attn = [f"{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    mlp = [f"{layer}.mlp.{p}" for p in ("gate_proj", "up_proj")]
    for group in (attn, mlp):
        want = global_scale_for(max(float(float_weights[n].abs().amax()) for n in group))
        for n in group:
            m = model.get_submodule(n)
            assert torch.equal(m.weight_zero_point, want), n
            p, s, _ = ops.quantize(float_weights[n], "nvfp4", group_size=16, zero_point=want)
            assert torch.equal(m.weight_packed, p) and torch.equal(m.weight_scale, s)
    own = model.get_submodule(f"{layer}.self_attn.o_proj").weight_zero_point
    assert torch.equal(own, global_scale_for(float(float_weights[f"{layer}.self_attn.o_proj"].abs().amax())))
    out = str(tmp_path / "streamed")
    stream_quantize(tiny_model_dir, plan, out)
    streamed = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            streamed.update(load_file(os.path.join(out, f)))
    state = model.state_dict()
    for n in attn + mlp:
        for part in ("weight_packed", "weight_scale", "weight_zero_point"):
            assert torch.equal(streamed[f"{n}.{part}"], state[f"{n}.{part}"]), (n, part)
