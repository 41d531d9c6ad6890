"""Plans with calibrated algorithms (gptq, awq, smoothquant) on a tiny random Llama, block by block."""
import copy

import pytest
import torch

from alphaquant.algorithms import smoothing
from alphaquant.algorithms.sequential import find_blocks
from alphaquant.nn import QuantLinear
from alphaquant.plans import PlanError, apply_plan, load_plan

transformers = pytest.importorskip("transformers")


def tiny_llama(layers=2, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # outlier input channels, as real models have, so that scaling matters
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(1 + 4 * (torch.rand(64) > 0.9))
    return model


def batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, 32), generator=g) for _ in range(n)]


def loss(model, data):
    with torch.no_grad():
        return sum(model(b, labels=b).loss.item() for b in data) / len(data)


def logit_error(model, ref, data):
    with torch.no_grad():
        return sum((model(b).logits - ref(b).logits).pow(2).mean().item() for b in data)


W3 = {"wq": "int3", "aq": "none", "group_size": 32, "symmetric": False, "dtype": "float32"}


def test_find_blocks():
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    name, blocks = find_blocks(model, names)
    assert name == "model.layers" and len(blocks) == 2


@pytest.mark.parametrize("extra", [{"algorithm": "gptq"}, {"algorithm": "gptq", "act_order": True},
                                   {"awq": True}, {"awq": True, "algorithm": "gptq"}])
def test_calibrated_plans_beat_round_to_nearest(extra):
    ref = tiny_llama()
    calib, held_out = batches(8, seed=1), batches(4, seed=2)
    rtn = copy.deepcopy(ref)
    apply_plan(rtn, {"default": W3})
    ours = copy.deepcopy(ref)
    report = apply_plan(ours, {"default": {**W3, **extra}}, calibration_batches=calib)
    assert all(isinstance(m, QuantLinear) for n, m in ours.named_modules() if n.endswith("_proj") or n == "lm_head")
    assert len(report.layers) == 15 and all(r.sqnr_db > 0 for r in report.layers)
    assert not any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() == 64 * 160
                   for t in ours.state_dict().values())  # no float weights left in the quantized linears
    assert logit_error(ours, ref, held_out) < 0.9 * logit_error(rtn, ref, held_out)


def test_gptq_layers_see_the_quantized_blocks_before_them(monkeypatch):
    """The Hessian of block 1 comes from inputs computed by the quantized block 0."""
    from alphaquant.algorithms import sequential

    model = tiny_llama()
    seen = {}
    original = sequential._collect

    def spy(block, inputs, targets, rows_per_batch=0):
        seen.setdefault(id(block), any(isinstance(m, QuantLinear) for m in model.model.layers[0].modules()))
        return original(block, inputs, targets, rows_per_batch)
    monkeypatch.setattr(sequential, "_collect", spy)
    apply_plan(model, {"default": {**W3, "algorithm": "gptq"}}, calibration_batches=batches(2))
    assert seen[id(model.model.layers[0])] is False and seen[id(model.model.layers[1])] is True


def test_folding_keeps_the_float_function():
    model = tiny_llama()
    data = batches(2)
    with torch.no_grad():
        before = [model(b).logits for b in data]
    block = model.model.layers[0]
    maps = smoothing.block_mappings(block, lambda n: True)
    # grouped-query attention: v_proj (128 outputs) does not map onto o_proj's 256... inputs
    assert [m.producer_name for m in maps] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    for m in maps:
        smoothing.fold(m, torch.rand(m.consumers[0].in_features) + 0.5)
    with torch.no_grad():
        for b, y in zip(data, before):
            torch.testing.assert_close(model(b).logits, y, rtol=1e-4, atol=1e-4)


def test_smoothquant_w8a8_is_closer_to_float():
    ref = tiny_llama()
    with torch.no_grad():  # strong activation outliers in a few channels
        for layer in ref.model.layers:
            layer.input_layernorm.weight[:3] *= 30
    plain = {"wq": "int8", "aq": "int8", "granularity": "per_channel", "act_granularity": "per_channel",
             "dtype": "float32"}
    held_out = batches(4, seed=2)
    a = copy.deepcopy(ref)
    apply_plan(a, {"default": plain})
    b = copy.deepcopy(ref)
    apply_plan(b, {"default": {**plain, "smoothquant": True}}, calibration_batches=batches(6))
    assert logit_error(b, ref, held_out) < 0.8 * logit_error(a, ref, held_out)


def test_calibrated_plan_needs_data_and_restores_on_failure():
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PlanError, match="gptq.*no calibration_batches"):
        apply_plan(model, {"default": {**W3, "algorithm": "gptq"}})

    def broken(m, b):
        raise RuntimeError("calibration blew up")
    with pytest.raises(RuntimeError, match="blew up"):
        apply_plan(model, {"default": {**W3, "awq": True}}, calibration_batches=batches(2), forward_fn=broken)
    calls = {"n": 0}
    from alphaquant.algorithms import gptq as gptq_mod
    original = gptq_mod.gptq_quantize

    def fail_late(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("late failure")
        return original(*a, **k)
    gptq_mod.gptq_quantize, saved = fail_late, gptq_mod.gptq_quantize
    try:
        with pytest.raises(RuntimeError, match="late failure"):
            apply_plan(model, {"default": {**W3, "awq": True, "algorithm": "gptq"}}, calibration_batches=batches(2))
    finally:
        gptq_mod.gptq_quantize = saved
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # folded norm scales were put back too


@pytest.mark.parametrize("scheme,match", [
    ({"algorithm": "obq"}, "algorithm must be one of"),
    ({"damp": -1}, "damp"),
    ({"block_size": 0}, "block_size"),
    ({"act_order": "yes"}, "act_order"),
    ({"smooth_alpha": 2}, "smooth_alpha"),
    ({"awq": True, "smoothquant": True}, "pick one"),
])
def test_bad_algorithm_keys(scheme, match):
    with pytest.raises(PlanError, match=match):
        load_plan({"default": {**W3, **scheme}})


def test_awq_in_default_and_smoothquant_in_override_conflict():
    with pytest.raises(PlanError, match="pick one"):
        load_plan({"default": {**W3, "awq": True}, "overrides": [{"pattern": "*", "smoothquant": True}]})


def test_lm_head_hessian_from_replayed_blocks_matches_a_full_forward(monkeypatch):
    import contextlib

    from alphaquant.algorithms import gptq as gptq_mod
    from alphaquant.algorithms import sequential

    original = gptq_mod.gptq_quantize
    seen = []

    def record(weight, hessian, *a, **k):
        if weight.shape[0] == 256:  # the lm_head
            seen.append(hessian.clone())
        return original(weight, hessian, *a, **k)
    monkeypatch.setattr(gptq_mod, "gptq_quantize", record)
    plan = {"default": {**W3, "algorithm": "gptq"}}
    monkeypatch.setattr(sequential, "merge_inputs", lambda inputs, rows=0: inputs)
    apply_plan(tiny_llama(), plan, calibration_batches=batches(5))
    monkeypatch.setattr(sequential, "_replaying", lambda *a, **k: contextlib.nullcontext())
    apply_plan(tiny_llama(), plan, calibration_batches=batches(5))
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1], rtol=1e-4, atol=1e-6)


def test_merge_inputs_only_merges_what_is_the_same():
    from alphaquant.algorithms.sequential import merge_inputs

    pos = torch.arange(4).unsqueeze(0)
    same = [((torch.randn(1, 4, 8),), {"position_ids": pos.clone(), "mask": None}) for _ in range(5)]
    merged = merge_inputs(same, rows=8)
    assert [m[0][0].shape[0] for m in merged] == [2, 2, 1]
    differ = same[:2] + [((torch.randn(1, 4, 8),), {"position_ids": pos + 1, "mask": None})]
    assert merge_inputs(differ, rows=8) is differ
    wide = [((torch.randn(2, 4, 8),), {}) for _ in range(3)]
    assert merge_inputs(wide) is wide


def test_merged_calibration_batches_give_the_same_block_outputs():
    from alphaquant.algorithms.sequential import capture_block_inputs, merge_inputs, run_block

    model = tiny_llama()
    inputs = capture_block_inputs(model, model.model.layers[0], batches(5), lambda m, b: m(b))
    merged = merge_inputs(inputs, rows=64)
    assert len(merged) == 3
    a = torch.cat([x[0][0] for x in run_block(model.model.layers[0], inputs)])
    b = torch.cat([x[0][0] for x in run_block(model.model.layers[0], merged)])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
