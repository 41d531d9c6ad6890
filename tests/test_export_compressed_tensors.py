"""Export to compressed-tensors, loaded back by the real transformers + compressed-tensors."""
import copy
import json
import os

import pytest
import torch

from alphaquant.export import ExportError, to_compressed_tensors
from alphaquant.plans import apply_plan

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")


def tiny_llama(tied=True):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def load(path, dequantize):
    from transformers import CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


ASYM = {"default": {"wq": "int4", "symmetric": False, "zero_point": "integer", "group_size": 32, "dtype": "float32",
                    "scale_dtype": "float16"},
        "overrides": [{"pattern": "lm_head", "skip": True}]}
MIXED = {"default": {"wq": "int4", "group_size": 16, "dtype": "float32"},
         "overrides": [{"pattern": "*mlp.down_proj", "wq": "int8", "granularity": "per_channel"},
                       {"pattern": "lm_head", "skip": True}]}


# transformers 5.24 loads asymmetric folders only with dequantize=True (compressed-tensors 0.20's
# meta-weight path never packs the zero point), and with dequantize=True only one scheme for all
# dense layers (get_dense_scheme); mixed symmetric folders load by its default path.
@pytest.mark.parametrize("plan,dequantize", [
    (ASYM, True),
    (MIXED, False),
    ({"default": {"wq": "int4", "group_size": 16, "dtype": "float32"}}, False),
    ({"default": {"wq": "int8", "granularity": "per_channel", "dtype": "float32"},
      "overrides": [{"pattern": "lm_head", "skip": True}]}, False),
])
def test_transformers_loads_the_exported_folder_with_our_weights(tmp_path, plan, dequantize):
    model = tiny_llama()
    apply_plan(model, plan)
    ours = logits(model)
    out = str(tmp_path / "ct")
    to_compressed_tensors(model, out)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    theirs = load(out, dequantize)
    torch.testing.assert_close(logits(theirs), ours, atol=1e-4, rtol=1e-4)
    # the weights they decode are ours, exactly
    ref = model.model.layers[1].self_attn.q_proj.dequantized_weight(torch.float32)
    got = theirs.model.layers[1].self_attn.q_proj
    if hasattr(got, "weight_packed") and not dequantize:
        pytest.skip("weights decoded lazily")
    torch.testing.assert_close(got.weight.detach().float(), ref, atol=0, rtol=0)


def test_the_config_groups_name_every_layer_and_ignore_the_float_ones(tmp_path):
    model = tiny_llama()
    apply_plan(model, {**ASYM, "overrides": MIXED["overrides"]})
    to_compressed_tensors(model, str(tmp_path / "ct"))
    qc = json.load(open(tmp_path / "ct" / "config.json"))["quantization_config"]
    groups = list(qc["config_groups"].values())
    assert len(groups) == 2
    w4 = next(g for g in groups if g["weights"]["num_bits"] == 4)
    assert w4["weights"] == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32,
                             "dynamic": False}
    assert qc["ignore"] == ["lm_head"]
    assert sum(len(g["targets"]) for g in groups) == 14


@pytest.mark.parametrize("plan,match", [
    ({"default": {"wq": "int4", "symmetric": False, "group_size": 32}}, "zero_point='integer'"),
    ({"default": {"wq": "fp4_e2m1", "group_size": 32}}, "no compressed-tensors"),
    ({"default": {"wq": "int4", "group_size": 48}}, "does not divide"),
    ({"default": {"wq": "int8", "aq": "int8", "granularity": "per_channel", "act_granularity": "per_group"}},
     "dynamic per token"),
    ({"default": {"wq": "int4", "aq": "int8", "group_size": 32, "act_granularity": "per_channel"}},
     "int-quantized"),
    ({"rotation": "hadamard", "default": {"wq": "int8", "granularity": "per_channel"}}, "rotates its input"),
])
def test_what_the_format_cannot_hold_is_refused_before_anything_is_written(tmp_path, plan, match):
    model = tiny_llama()
    apply_plan(model, plan)
    with pytest.raises(ExportError, match=match):
        to_compressed_tensors(model, str(tmp_path / "ct"))
    assert not os.path.exists(tmp_path / "ct")
    assert os.listdir(tmp_path) == []


def test_force_replaces_only_an_export_folder(tmp_path):
    model = tiny_llama()
    apply_plan(model, MIXED)
    out = tmp_path / "ct"
    to_compressed_tensors(model, str(out))
    with pytest.raises(FileExistsError):
        to_compressed_tensors(model, str(out))
    to_compressed_tensors(model, str(out), force=True)  # an earlier export: replaced
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="not a compressed-tensors folder"):
        to_compressed_tensors(model, str(precious), force=True)
    assert (precious / "notes.txt").read_text() == "keep"


def test_export_from_the_command_line(tmp_path, capsys):
    from alphaquant.cli import main
    from tiny_llama import save_tiny_llama

    src = save_tiny_llama(tmp_path / "src")
    q = str(tmp_path / "q")
    assert main(["quantize", src, "--plan", "gptq_w4_g64_export", "--out", q, "--no-eval", "--calib-tokens",
                 "512"]) == 0
    out = str(tmp_path / "ct")
    assert main(["export", q, "--to", "compressed-tensors", "--out", out]) == 0
    theirs = load(out, dequantize=True)
    from alphaquant.cli.checkpoint_folder import load_checkpoint

    ours, _ = load_checkpoint(q)
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
    capsys.readouterr()
    assert main(["eval", q, "--eval-tokens", "512"]) == 0
    ppl_ours = float(capsys.readouterr().out.split("perplexity")[-1])
    assert main(["eval", out, "--eval-tokens", "512"]) == 0  # the exported folder, imported from its codes
    assert abs(float(capsys.readouterr().out.split("perplexity")[-1]) - ppl_ours) < 1e-3 * ppl_ours
    assert main(["export", q, "--to", "compressed-tensors", "--out", out]) == 2
    assert "--force" in capsys.readouterr().err
    fp4 = str(tmp_path / "fp4")
    assert main(["quantize", src, "--plan", "fp4", "--out", fp4, "--no-eval"]) == 0
    assert main(["export", fp4, "--to", "compressed-tensors", "--out", str(tmp_path / "x")]) == 2
    assert "weights have no compressed-tensors form" in capsys.readouterr().err


@pytest.mark.parametrize("preset,layout", [("w8a8", "int-quantized"), ("fp8", "float-quantized"),
                                           ("w8a16", "pack-quantized")])
def test_w8a8_and_fp8_presets_export_with_their_activation_schemes(tmp_path, preset, layout):
    from alphaquant.cli.presets import resolve_plan

    model = tiny_llama()
    apply_plan(model, resolve_plan(preset)[1])
    ours = logits(model)
    out = str(tmp_path / "ct")
    to_compressed_tensors(model, out)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == group["format"] == layout
    acts = group["input_activations"]
    assert (acts is None) == (preset == "w8a16")
    if acts is not None:
        assert acts["strategy"] == "token" and acts["dynamic"] is True
    exact = load(out, dequantize=True)  # weights only: they are ours, bit for bit
    for name in ("model.layers.0.self_attn.k_proj", "lm_head"):
        torch.testing.assert_close(exact.get_submodule(name).weight.detach().float(),
                                   model.get_submodule(name).dequantized_weight(torch.float32), atol=0, rtol=0)
    if acts is not None:  # transformers' own path fake-quantizes the activations per token, as we do
        theirs = load(out, dequantize=False)
        assert (logits(theirs) - ours).abs().max() < 0.02 * ours.abs().max()


def test_quantize_writes_a_compressed_tensors_folder_directly(tmp_path, capsys):
    from alphaquant.cli import main
    from tiny_llama import save_tiny_llama

    src = save_tiny_llama(tmp_path / "src")
    plan_file = tmp_path / "asym.json"
    plan_file.write_text(json.dumps(ASYM))
    out = tmp_path / "ct"
    assert main(["quantize", src, "--plan", str(plan_file), "--format", "compressed-tensors", "--out", str(out),
                 "--no-eval"]) == 0
    ours = copy.deepcopy(transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32))
    apply_plan(ours, ASYM)
    theirs = load(str(out), dequantize=True)
    for name, m in ours.named_modules():
        if hasattr(m, "dequantized_weight"):
            assert torch.equal(theirs.get_submodule(name).weight, m.dequantized_weight()), name
    # a float zero point has no compressed-tensors form: refused before the model is quantized
    float_zp = tmp_path / "float_zp.json"
    float_zp.write_text(json.dumps({"default": {**ASYM["default"], "zero_point": "float"}}))
    other = tmp_path / "other"
    assert main(["quantize", src, "--plan", str(float_zp), "--format", "compressed-tensors", "--out", str(other),
                 "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "does not export to compressed-tensors" in err and "zero_point" in err and not other.exists()
    # --force replaces an export, never a folder of something else
    assert main(["quantize", src, "--plan", str(plan_file), "--format", "compressed-tensors", "--out", src,
                 "--force", "--no-eval"]) == 2
    assert os.path.isfile(os.path.join(src, "config.json"))


@pytest.mark.parametrize("wq, layout", [("nvfp4", "nvfp4-pack-quantized"), ("mxfp4", "mxfp4-pack-quantized"),
                                        ("mxfp6_e2m3", "mxfp6-pack-quantized"), ("mxfp8", "mxfp8-quantized")])
def test_block_scaled_formats_export_as_their_bytes(tmp_path, wq, layout):
    """nvfp4 and MX weights: the library's own compressor for that format decompresses our folder's
    tensors to our dequantized weights exactly (in its bf16 output), and transformers loads the
    folder (decompressing it) with our logits."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    model = tiny_llama()
    apply_plan(model, {"default": {"wq": wq, "dtype": "float32"}, "overrides": [{"pattern": "lm_head", "skip": True}]})
    ours = logits(model)
    out = str(tmp_path / "ct")
    to_compressed_tensors(model, out)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["format"] == layout and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    compressor = BaseCompressor.load_from_registry(layout)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == name}
        assert ("weight_packed" in layer) != ("weight" in layer) and layer["weight_scale"].dtype != torch.float32
        theirs = compressor.decompress(layer, scheme)["weight"]
        mine = model.get_submodule(name).dequantized_weight(theirs.dtype)
        assert torch.equal(theirs, mine), name
    loaded = load(out, dequantize=True)
    torch.testing.assert_close(logits(loaded), ours, atol=2e-2, rtol=2e-2)  # their weights are bf16-rounded


def test_nvfp4_export_refuses_short_blocks_and_quantized_activations(tmp_path):
    model = tiny_llama()
    apply_plan(model, {"default": {"wq": "nvfp4", "aq": "nvfp4"}})
    with pytest.raises(ExportError, match="weight-only"):
        to_compressed_tensors(model, str(tmp_path / "ct"))
    assert not os.path.exists(tmp_path / "ct")
