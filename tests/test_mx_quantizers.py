"""MX quantizers, configs, plans, QuantLinear, save/load and the command line."""
import json
import os

import pytest
import torch
from torch import nn

from alphaquant import ops
from alphaquant.plans import PlanError, apply_plan
from alphaquant.quantizers import (MXFP4Config, MXFP4Quantizer, MXFP6Config, MXFP6Quantizer, MXFP8Config,
                                   MXFP8Quantizer, MXINT8Config, MXINT8Quantizer)
from alphaquant.quantizers.registry import create_quantizer_from_scheme

QUANTIZERS = [(MXFP4Quantizer, MXFP4Config, "e2m1", "mxfp4_e2m1", 4.25),
              (MXFP6Quantizer, MXFP6Config, "e3m2", "mxfp6_e3m2", 6.25),
              (MXFP6Quantizer, MXFP6Config, "e2m3", "mxfp6_e2m3", 6.25),
              (MXFP8Quantizer, MXFP8Config, "e4m3", "mxfp8_e4m3", 8.25),
              (MXFP8Quantizer, MXFP8Config, "e5m2", "mxfp8_e5m2", 8.25),
              (MXINT8Quantizer, MXINT8Config, "int8", "mxint8", 8.25)]


@pytest.mark.parametrize("q_cls, cfg_cls, element, fmt, bits", QUANTIZERS)
def test_seed_style_quantizers_store_the_bits_and_one_byte_per_block(q_cls, cfg_cls, element, fmt, bits):
    q = q_cls(cfg_cls(format=element))
    assert q.fmt == fmt
    w = torch.randn(48, 256)
    packed = q.quantize_weight(w)
    assert packed.scale.dtype == torch.uint8 and packed.zero_point is None
    assert packed.nbytes * 8 / w.numel() == bits  # exactly: codes plus one E8M0 byte per 32
    want = ops.dequantize(*ops.quantize(w, fmt, symmetric=True, group_size=32)[:2], None, fmt, symmetric=True,
                          group_size=32, k=256)
    assert torch.equal(q.dequantize(packed).float(), want.to(q.config.torch_dtype).float())
    odd = q.quantize_weight(torch.randn(5, 45))  # a short last block
    assert odd.scale.shape == (5, 2)
    x = torch.randn(4, 64)
    assert torch.equal(q.quantize_activation(x).float(),
                       ops.fake_quantize(x, fmt, symmetric=True, group_size=32).to(q.config.torch_dtype).float())


def test_configs_refuse_what_mx_fixes():
    with pytest.raises(ValueError, match="format must be one of"):
        MXFP6Config(format="e4m3")
    with pytest.raises(ValueError, match="block of 32 values: group_size must be 32"):
        MXFP4Config(group_size=64)
    with pytest.raises(ValueError, match="granularity per_group"):
        MXFP8Config(granularity="per_channel")
    with pytest.raises(ValueError, match="clip_search and zero_opt do not apply"):
        MXFP4Config(clip_search=True)
    with pytest.raises(ValueError, match="E8M0 bytes"):
        MXINT8Config(scale_dtype="float16")
    q = MXFP8Quantizer(MXFP8Config())
    from alphaquant.quantizers import MinMaxObserver
    with pytest.raises(ValueError, match="take no observer"):
        q.attach_observer(MinMaxObserver())


@pytest.mark.parametrize("name, fmt", [("mxfp4", "mxfp4_e2m1"), ("mxfp6_e2m3", "mxfp6_e2m3"), ("mxfp8", "mxfp8_e4m3"),
                                       ("mxfp8_e5m2", "mxfp8_e5m2"), ("mxint8", "mxint8")])
def test_registry_names(name, fmt):
    (wq, wcfg), _ = create_quantizer_from_scheme({"wq": name, "aq": None}, dtype="float32")
    assert wq(wcfg()).fmt == fmt


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 40))


def test_plans_save_and_load_mx_layers_without_float_weights(tmp_path):
    from alphaquant.checkpoint_file import load_quantized, save_quantized

    plan = {"default": {"wq": "mxfp4", "aq": "mxfp8", "dtype": "float32"},
            "overrides": [{"pattern": "2", "wq": "mxint8", "aq": "none"}]}
    model = _mlp()
    x = torch.randn(3, 96)
    ref = model(x)
    report = apply_plan(model, plan)
    assert [r.bits_per_weight for r in report.layers] == [4.25, 8.25]
    got = model(x)
    assert 0 < float((got - ref).norm() / ref.norm()) < 0.3
    path = str(tmp_path / "m.safetensors")
    save_quantized(model, path, plan)
    state = model.state_dict()
    assert all(v.dtype == torch.uint8 for k, v in state.items() if not k.endswith("bias"))
    fresh = _mlp()
    load_quantized(fresh, path)
    assert torch.equal(fresh(x), got)
    with pytest.raises(PlanError, match="block of 32 values"):
        apply_plan(_mlp(), {"default": {"wq": "mxfp4", "group_size": 64}})
    with pytest.raises(PlanError, match="gptq does not take block-scaled formats"):
        apply_plan(_mlp(), {"default": {"wq": "mxfp4", "algorithm": "gptq"}}, calibration_batches=[torch.randn(2, 96)])


def test_a_nan_scale_byte_in_a_checkpoint_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from alphaquant.checkpoint_file import load_quantized, save_quantized

    plan = {"default": {"wq": "mxfp8", "dtype": "float32"}}
    model = _mlp()
    apply_plan(model, plan)
    path = str(tmp_path / "m.safetensors")
    save_quantized(model, path, plan)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["0.weight_scale"][0, 0] = 255
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="E8M0 scale byte"):
        load_quantized(_mlp(), path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tiny_llama import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_mx"))


@pytest.mark.parametrize("preset", ["mxfp4", "mxfp8"])
def test_cli_presets(tiny_model_dir, tmp_path, preset, capsys):
    from alphaquant.cli.checkpoint_folder import load_checkpoint
    from alphaquant.cli.main import main

    out = str(tmp_path / preset)
    assert main(["quantize", tiny_model_dir, "--plan", preset, "--out", out, "--no-eval"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    bits = {r["bits_per_weight"] for r in report["layers"]}
    assert bits == {4.25 if preset == "mxfp4" else 8.25}
    model, tok = load_checkpoint(out)
    with torch.no_grad():
        logits = model(tok("the", return_tensors="pt")["input_ids"]).logits
    assert torch.isfinite(logits).all()
