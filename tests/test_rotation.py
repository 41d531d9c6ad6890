"""Hadamard matrices, the rotation of a Llama-family model, and plans with "rotation": "hadamard"."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from alphaquant.algorithms.hadamard import hadamard_factors, hadamard_matrix, hadamard_transform
from alphaquant.algorithms.rotation import ATTR, rotate_model
from alphaquant.checkpoint_file import load_quantized, save_quantized
from alphaquant.nn import QuantLinear
from alphaquant.plans import PlanError, apply_plan, load_plan
from alphaquant.quantizers import INT8Quantizer, INT8Config

transformers = pytest.importorskip("transformers")

SIZES = [1, 2, 4, 12, 20, 24, 44, 48, 64, 96, 576, 768, 1536]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matrix_is_orthogonal_with_equal_magnitudes(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(SIZES), st.integers(1, 5), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_hadamard_transform_matches_the_dense_matrix(n, rows, lead, seed):
    x = torch.randn(lead, rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), x @ hadamard_matrix(n))


def test_hadamard_transform_keeps_16_bit_dtypes_and_non_contiguous_inputs():
    x = torch.randn(7, 192 * 2)[:, ::2]  # non-contiguous, 192 = 12 x 16
    ref = x @ hadamard_matrix(192).float()
    torch.testing.assert_close(hadamard_transform(x), ref, atol=1e-5, rtol=1e-5)
    y = hadamard_transform(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)


def test_sizes_without_a_construction_are_refused_clearly():
    assert hadamard_factors(11008) is None  # 2^8 x 43: needs an order-172 matrix
    with pytest.raises(ValueError, match="no Hadamard matrix of order 11008"):
        hadamard_matrix(11008)
    with pytest.raises(ValueError, match="order 11008"):
        hadamard_transform(torch.zeros(1, 11008))


def tiny_llama(tied=True, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                   attention_bias=True)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norm weights that are not all one, and a few outlier channels
        for norm in [m for n, m in model.named_modules() if n.endswith("norm")]:
            norm.weight.copy_(0.5 + torch.rand(48) + 50.0 * (torch.arange(48) % 17 == 3))
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tied", [True, False])
def test_rotation_keeps_the_float_function(tied):
    model = tiny_llama(tied)
    ref = logits(model, IDS)
    rotate_model(model, seed=3)
    torch.testing.assert_close(logits(model, IDS), ref, atol=2e-4, rtol=1e-4)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert all(getattr(l.mlp.down_proj, ATTR) == "hadamard" for l in model.model.layers)
    assert torch.equal(model.model.norm.weight, torch.ones(48))


def test_rotation_spreads_outlier_channels():
    model = tiny_llama()
    hidden = {}
    model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: hidden.__setitem__("x", a[0]))
    logits(model, IDS)
    before = hidden["x"].abs().amax(-1) / hidden["x"].pow(2).mean(-1).sqrt()
    rotate_model(model)
    model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: hidden.__setitem__("x", a[0]))
    logits(model, IDS)
    after = hidden["x"].abs().amax(-1) / hidden["x"].pow(2).mean(-1).sqrt()
    assert after.mean() < 0.8 * before.mean()  # peak-to-rms ratio per token, what int8 loses to (3.0 vs 4.2)


W8A8 = {"default": {"wq": "int8", "aq": "int8", "granularity": "per_channel", "act_granularity": "per_channel",
                    "dtype": "float32"}}


def test_a_rotated_w8a8_plan_is_closer_to_float():
    model = tiny_llama()
    ref = logits(model, IDS)
    plain, rotated = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(plain, W8A8)
    apply_plan(rotated, {**W8A8, "rotation": "hadamard"})
    err_plain = (logits(plain, IDS) - ref).pow(2).mean()
    err_rot = (logits(rotated, IDS) - ref).pow(2).mean()
    assert err_rot < 0.7 * err_plain  # 0.0018 vs 0.0036
    assert rotated.model.layers[0].mlp.down_proj.input_rotation == "hadamard"
    assert rotated.model.layers[0].mlp.up_proj.input_rotation is None


def test_quant_linear_rotates_its_input_before_quantizing_activations():
    lin = torch.nn.Linear(24, 5)
    q = QuantLinear.from_linear(lin, INT8Quantizer(INT8Config(group_size=12, dtype="float32")))
    r = QuantLinear(24, 5, True, "int8", True, 12, input_rotation="hadamard")
    r.load_packed(q.packed_weight)
    r.bias.copy_(lin.bias.detach())
    x = torch.randn(3, 24)
    torch.testing.assert_close(r(x), q(x @ hadamard_matrix(24).float()), atol=1e-5, rtol=1e-5)
    assert "input_rotation=hadamard" in repr(r)
    with pytest.raises(ValueError, match="Hadamard rotation of 11008"):
        QuantLinear(11008, 4, False, "int8", True, 128, input_rotation="hadamard")


def test_gptq_plan_with_rotation_saves_and_loads(tmp_path):
    model = tiny_llama()
    plan = {"rotation": "hadamard", "default": {"wq": "int4", "group_size": 16, "algorithm": "gptq",
                                                 "dtype": "float32", "symmetric": False},
            "overrides": [{"pattern": "lm_head", "skip": True}]}
    batches = [torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    apply_plan(model, plan, calibration_batches=batches)
    out = logits(model, IDS)
    path = str(tmp_path / "rot.safetensors")
    save_quantized(model, path, load_plan(plan))
    fresh = tiny_llama(seed=5)  # other weights: everything must come from the file
    load_quantized(fresh, path)
    torch.testing.assert_close(logits(fresh, IDS), out)
    assert fresh.lm_head.weight is not fresh.model.embed_tokens.weight  # float lm_head: its own rotated copy
    assert isinstance(fresh.model.layers[1].mlp.down_proj, QuantLinear)


def test_a_checkpoint_without_rotation_does_not_load_into_a_rotated_plan(tmp_path):
    model = tiny_llama()
    apply_plan(model, W8A8)
    path = str(tmp_path / "plain.safetensors")
    save_quantized(model, path, {**load_plan(W8A8), "rotation": "hadamard"})  # plan and layers disagree
    with pytest.raises(ValueError, match="input_rotation"):
        load_quantized(tiny_llama(), path)


def test_bad_rotation_values_and_models_are_refused():
    with pytest.raises(PlanError, match="'rotation' must be one of"):
        load_plan({**W8A8, "rotation": "spin"})
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=48, vocab_size=50))
    with pytest.raises(PlanError, match="Llama-family"):
        apply_plan(bert, {**W8A8, "rotation": "hadamard"})


def test_a_failed_plan_undoes_the_rotation():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = logits(model, IDS)

    def failing_progress(items, desc):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        apply_plan(model, {**W8A8, "rotation": "hadamard"}, progress=failing_progress)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not hasattr(model.model.layers[0].mlp.down_proj, ATTR)
    torch.testing.assert_close(logits(model, IDS), ref)


def test_rotating_a_rotated_model_again_changes_nothing():
    model = tiny_llama()
    rotate_model(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rotate_model(model, seed=9)
    apply_plan(model, {**W8A8, "rotation": "hadamard", "default": {**W8A8["default"], "skip": True}})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_rotated_quant_linear_compiles_with_fullgraph():
    r = QuantLinear(96, 5, True, "int8", True, 32, input_rotation="hadamard")
    x = torch.randn(3, 96)
    torch.testing.assert_close(torch.compile(r, fullgraph=True)(x), r(x), atol=1e-5, rtol=1e-5)
    assert "rotation_factor0" not in r.state_dict()  # rebuilt from input_rotation, never stored


def test_scaling_is_not_folded_across_an_online_rotation():
    from alphaquant.algorithms.smoothing import block_mappings

    model = tiny_llama()
    layer = model.model.layers[0]
    before = [m.producer_name for m in block_mappings(layer, lambda n: True)]
    rotate_model(model)
    after = [m.producer_name for m in block_mappings(layer, lambda n: True)]
    assert "mlp.up_proj" in before and "mlp.up_proj" not in after
    assert "input_layernorm" in after


def test_awq_gptq_on_a_rotated_model_stays_close_to_float():
    model = tiny_llama()
    ref = logits(model, IDS)
    batches = [torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    plan = {"default": {"wq": "int8", "group_size": 16, "algorithm": "gptq", "awq": True, "dtype": "float32"}}
    apply_plan(model, {**plan, "rotation": "hadamard"}, calibration_batches=batches)
    assert (logits(model, IDS) - ref).abs().max() < 0.05 * ref.abs().max()
