"""Asymmetric int weights with integer zero points (zero_point="integer"), as GPTQ and
compressed-tensors store them."""
import pytest
import torch

from alphaquant.algorithms.gptq import GPTQOptions, gptq_quantize
from alphaquant.plans import PlanError, apply_plan, load_plan
from alphaquant.quantizers import INT4Config, INT4Quantizer, INT8Config, INT8Quantizer


@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("cls,cfg,levels", [(INT4Quantizer, INT4Config, 16), (INT8Quantizer, INT8Config, 256)])
def test_zero_points_are_integers_in_the_code_range(cls, cfg, levels, scale_dtype):
    w = torch.randn(37, 100) + 0.3  # odd rows, a short last group, an offset range
    q = cls(cfg(symmetric=False, zero_point="integer", group_size=32, scale_dtype=scale_dtype, dtype="float32"))
    p = q.quantize_weight(w)
    z = p.zero_point.float()
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= levels - 1
    err = (p.dequantize(torch.float32) - w).abs().max()
    # half a step of rounding; the zero point's rounding moves the range by < half a step inside
    # the clamp; a scale rounded to 16 bits shrinks the range by up to levels * its rounding error
    eps = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}[scale_dtype]
    assert err <= (0.51 + levels * eps) * p.scale.float().max()
    again = q.pack_with_scales(w, p.scale, p.zero_point)  # stored values are exactly what was computed with
    assert torch.equal(again.data, p.data)


def test_all_positive_groups_clamp_the_zero_point():
    w = torch.rand(4, 64) + 5.0  # min > 0: the zero point would be negative
    p = INT4Quantizer(INT4Config(symmetric=False, zero_point="integer", group_size=64, dtype="float32")).quantize_weight(w)
    assert p.zero_point.min() >= 0
    assert (p.dequantize(torch.float32) - w).abs().max() < 0.6 * p.scale.max()


def test_integer_zero_points_need_an_asymmetric_int_format():
    with pytest.raises(ValueError, match="needs symmetric=False"):
        INT4Config(symmetric=True, zero_point="integer")
    with pytest.raises(ValueError, match="zero_point must be one of"):
        INT4Config(symmetric=False, zero_point="int")
    with pytest.raises(PlanError, match="needs \"symmetric\": false"):
        load_plan({"default": {"wq": "int4", "zero_point": "integer"}})
    with pytest.raises(PlanError, match="overrides.0.: zero_point 'integer' needs"):
        load_plan({"default": {"wq": "int4"}, "overrides": [{"pattern": "x", "zero_point": "integer"}]})
    # a symmetric override under an integer-zero-point default simply has no zero point
    load_plan({"default": {"wq": "int4", "symmetric": False, "zero_point": "integer"},
               "overrides": [{"pattern": "x", "wq": "int8", "symmetric": True}]})
    with pytest.raises(PlanError, match="zero_point must be float, integer or byte"):
        load_plan({"default": {"wq": "int4", "symmetric": False, "zero_point": 0}})


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_integer_zero_points_keeps_them_integer_and_beats_round_to_nearest(act_order):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 96, generator=g)
    x = torch.randn(512, 12, generator=g) @ torch.randn(12, 96, generator=g) + 0.1 * torch.randn(512, 96, generator=g)
    h = x.T @ x
    q = INT4Quantizer(INT4Config(symmetric=False, zero_point="integer", group_size=32, scale_dtype="float16",
                                 dtype="float32"))
    p = gptq_quantize(w, h, q, GPTQOptions(act_order=act_order, refit=True))
    z = p.zero_point.float()
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 15

    def out_err(packed):
        d = packed.dequantize(torch.float32) - w
        return float(((d @ h) * d).sum())
    assert out_err(p) < 0.5 * out_err(q.quantize_weight(w))
    no_refit = gptq_quantize(w, h, q, GPTQOptions(act_order=act_order, refit=False))
    assert out_err(p) < 0.9 * out_err(no_refit)  # the refit moves integer zero points too (4182 vs 5929)


def test_plan_with_integer_zero_points():
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    apply_plan(model, {"default": {"wq": "int4", "symmetric": False, "zero_point": "integer", "group_size": 32}})
    z = model[0].weight_zero_point.float()
    assert torch.equal(z, z.round())
