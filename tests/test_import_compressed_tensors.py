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


def write_with_compressed_tensors(path, num_bits, symmetric, strategy, group_size=None):
    """A random tiny Llama quantized and saved by compressed-tensors' own code (min/max qparams)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    args = QuantizationArgs(num_bits=num_bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size)
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                            ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, qc)
    for _, m in model.named_modules():
        if getattr(m, "quantization_scheme", None) is not None and m.quantization_scheme.weights is not None:
            w = m.weight.data
            if strategy == "group":
                wg = w.unflatten(-1, (-1, group_size))
                mn, mx = wg.amin(-1), wg.amax(-1)
            else:
                mn, mx = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            s, z = calculate_qparams(mn, mx, args)
            m.weight_scale.data = s.to(m.weight_scale.dtype).reshape(m.weight_scale.shape)
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data = z.to(m.weight_zero_point.dtype).reshape(m.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model)
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


def test_damaged_folders_are_refused_with_the_reason(tmp_path):
    from safetensors.torch import load_file, save_file

    path = write_with_compressed_tensors(tmp_path / "ct", 4, True, "group", 32)
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    del t["model.layers.0.self_attn.q_proj.weight_scale"]
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ExportError, match="weight_scale is missing"):
        load_compressed_tensors(path)
