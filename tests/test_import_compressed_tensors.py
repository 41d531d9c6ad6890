"""Import of compressed-tensors folders written by compressed-tensors itself (its own quantization
and ModelCompressor, as llm-compressor uses them): our layers hold the stored codes and compute
what transformers computes from the same folder."""
import os

import pytest
import torch

from alphaquant.export import ExportError
from alphaquant.export.from_compressed_tensors import is_compressed_tensors_folder, load_compressed_tensors
from alphaquant.nn import QuantLinear

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")


def write_with_compressed_tensors(path, num_bits, symmetric, strategy, group_size=None, kind="int", activations=None,
                                 layout=None):
    """A random tiny Llama quantized and saved by compressed-tensors' own code (min/max qparams);
    ``activations`` ("int" / "float"): 8-bit dynamic per-token input activations as well."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    args = QuantizationArgs(num_bits=num_bits, type=kind, symmetric=symmetric, strategy=strategy, group_size=group_size)
    acts = None if activations is None else QuantizationArgs(num_bits=8, type=activations, symmetric=True,
                                                             strategy="token", dynamic=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=acts)
    qc = QuantizationConfig(config_groups={"group_0": scheme},
                            ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, qc)
    for _, m in model.named_modules():
        if getattr(m, "quantization_scheme", None) is not None and m.quantization_scheme.weights is not None:
            w = m.weight.data
            if strategy == "tensor":
                mn, mx = w.amin().reshape(1), w.amax().reshape(1)
            elif strategy == "group":
                wg = w.unflatten(-1, (-1, group_size))
                mn, mx = wg.amin(-1), wg.amax(-1)
            else:
                mn, mx = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            s, z = calculate_qparams(mn, mx, args)
            m.weight_scale.data = s.to(m.weight_scale.dtype).reshape(m.weight_scale.shape)
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data = z.to(m.weight_zero_point.dtype).reshape(m.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=layout)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    return str(path)


def reference(path):
    from transformers import CompressedTensorsConfig

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


@pytest.mark.parametrize("num_bits,symmetric,strategy,group", [
    (4, False, "group", 32), (4, True, "group", 32), (4, False, "channel", None), (8, True, "channel", None),
    (8, False, "group", 16),
])
def test_a_folder_compressed_tensors_wrote_imports_from_its_codes(tmp_path, num_bits, symmetric, strategy, group):
    path = write_with_compressed_tensors(tmp_path / "ct", num_bits, symmetric, strategy, group)
    assert is_compressed_tensors_folder(path)
    ours, _ = load_compressed_tensors(path)
    theirs = reference(path)
    q = ours.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.fmt == f"int{num_bits}" and q.symmetric == symmetric
    assert not any(k.endswith(".weight") and "layers" in k and "norm" not in k for k in ours.state_dict())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        torch.testing.assert_close(ours.get_submodule(name).dequantized_weight(torch.float32),
                                   theirs.get_submodule(name).weight.detach().float(), atol=0, rtol=0)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,strategy,activations,layout,fmt", [
    ("float", "channel", "float", "float-quantized", "fp8_e4m3"),  # llm-compressor's FP8_DYNAMIC
    ("float", "tensor", None, "naive-quantized", "fp8_e4m3"),  # weight-only fp8: ct's fallback layout
    ("int", "channel", "int", "int-quantized", "int8"),  # W8A8 with dynamic per-token activations
])
def test_fp8_and_w8a8_folders_import_from_their_codes(tmp_path, kind, strategy, activations, layout, fmt):
    import json

    path = write_with_compressed_tensors(tmp_path / "ct", 8, True, strategy, kind=kind, activations=activations)
    qc = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    assert qc["config_groups"]["group_0"]["format"] == layout
    ours, _ = load_compressed_tensors(path)
    q = ours.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.fmt == fmt and q.group_size == (0 if strategy == "channel" else -1)
    assert (q.act_quantizer is None) == (activations is None)
    if activations is not None:
        assert q.act_quantizer.fmt == {"int": "int8", "float": "fp8_e4m3"}[activations]
    theirs = reference(path)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        torch.testing.assert_close(ours.get_submodule(name).dequantized_weight(torch.float32),
                                   theirs.get_submodule(name).weight.detach().float(), atol=0, rtol=0)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = theirs(ids).logits
        if activations is None:
            torch.testing.assert_close(ours(ids).logits, ref, atol=1e-4, rtol=1e-4)
        else:  # activations quantized per token by us, float in the dequantized reference
            assert (ours(ids).logits - ref).abs().max() < 0.05 * ref.abs().max()


def test_int4_stored_one_value_per_byte_imports_packed(tmp_path):
    """naive-quantized int4 (asymmetric, signed zero points one per byte) becomes our 4-bit codes."""
    path = write_with_compressed_tensors(tmp_path / "ct", 4, False, "group", 32, layout="naive-quantized")
    ours, _ = load_compressed_tensors(path)
    theirs = reference(path)
    q = ours.model.layers[0].self_attn.q_proj
    assert q.fmt == "int4" and q.weight_packed.shape == (64, 32)  # packed: half a byte per value
    torch.testing.assert_close(q.dequantized_weight(torch.float32),
                               theirs.model.layers[0].self_attn.q_proj.weight.detach().float(), atol=0, rtol=0)


def test_our_w8a8_and_fp8_exports_import_back_to_the_same_layers(tmp_path):
    from alphaquant.cli.presets import resolve_plan
    from alphaquant.export import to_compressed_tensors
    from alphaquant.plans import apply_plan

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    for preset in ("w8a8", "fp8"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
        apply_plan(model, resolve_plan(preset)[1])
        out = str(tmp_path / preset)
        to_compressed_tensors(model, out)
        back, _ = load_compressed_tensors(out)
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                b = back.get_submodule(name)
                assert torch.equal(b.weight_packed, m.weight_packed) and torch.equal(b.weight_scale, m.weight_scale)
                assert b.act_quantizer.fmt == m.act_quantizer.fmt, name
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_static_activation_scales_are_refused_with_what_imports(tmp_path):
    import json

    path = write_with_compressed_tensors(tmp_path / "ct", 8, True, "channel", kind="float", activations="float")
    cfg_file = os.path.join(path, "config.json")
    raw = json.load(open(cfg_file))
    raw["quantization_config"]["config_groups"]["group_0"]["input_activations"].update(dynamic=False, strategy="tensor")
    json.dump(raw, open(cfg_file, "w"))
    with pytest.raises(ExportError, match="dynamic per token"):
        load_compressed_tensors(path)


def test_inspect_describes_a_compressed_tensors_folder(tmp_path, capsys):
    from alphaquant.cli import main

    path = write_with_compressed_tensors(tmp_path / "ct", 4, False, "group", 32)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "pack-quantized, weights int4 asym group 32, activations float" in out and "kept as codes" in out
    assert "kept float (ignore): lm_head" in out and "bytes of quantized weights" in out


def test_damaged_folders_are_refused_with_the_reason(tmp_path):
    from safetensors.torch import load_file, save_file

    path = write_with_compressed_tensors(tmp_path / "ct", 4, True, "group", 32)
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    del t["model.layers.0.self_attn.q_proj.weight_scale"]
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ExportError, match="weight_scale is missing"):
        load_compressed_tensors(path)


@pytest.mark.parametrize("preset", ["nvfp4", "mxfp4", "mxfp8_weights"])
def test_block_scaled_exports_import_to_the_same_bytes(tmp_path, preset):
    """Our nvfp4 / MX exports read back into layers holding the same bytes and computing the same logits."""
    from alphaquant.cli.presets import resolve_plan
    from alphaquant.export import to_compressed_tensors
    from alphaquant.plans import apply_plan

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    plan = resolve_plan(preset)[1]
    plan = {**plan, "overrides": [{"pattern": "lm_head", "skip": True}]}
    apply_plan(model, plan)
    to_compressed_tensors(model, str(tmp_path / "ct"))
    ours, _ = load_compressed_tensors(str(tmp_path / "ct"))
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            got = ours.get_submodule(name)
            assert got.fmt == m.fmt and torch.equal(got.weight_packed, m.weight_packed), name
            assert torch.equal(got.weight_scale, m.weight_scale), name
            assert (m.weight_zero_point is None) == (got.weight_zero_point is None), name
            if m.weight_zero_point is not None:
                assert torch.equal(got.weight_zero_point, m.weight_zero_point), name
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, model(ids).logits)


def test_an_nvfp4_folder_compressed_tensors_wrote_imports_from_its_bytes(tmp_path):
    """NVFP4A16 as compressed-tensors quantizes and compresses it (its global scales, its E4M3
    scales, its packer): our layers decode exactly what its decompressor decodes."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("NVFP4A16", ["Linear"])},
                            ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, qc)
    for _, m in model.named_modules():
        if getattr(m, "quantization_scheme", None) is not None:
            w = m.weight.data
            gs = generate_gparam(w.min(), w.max())
            wg = w.unflatten(-1, (-1, 16))
            s, _ = calculate_qparams(wg.amin(-1), wg.amax(-1), m.quantization_scheme.weights, global_scale=gs)
            m.weight_global_scale.data = gs.to(m.weight_global_scale.dtype)
            m.weight_scale.data = s.to(m.weight_scale.dtype).reshape(m.weight_scale.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="nvfp4-pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(tmp_path / "ct")
    compressor.update_config(str(tmp_path / "ct"))
    ours, _ = load_compressed_tensors(str(tmp_path / "ct"))
    theirs = reference(str(tmp_path / "ct"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        q = ours.get_submodule(name)
        assert isinstance(q, QuantLinear) and q.fmt == "nvfp4"
        torch.testing.assert_close(q.dequantized_weight(torch.bfloat16).float(),
                                   theirs.get_submodule(name).weight.detach().float(), atol=0, rtol=0)
