"""Quantizer configs, the registry, stochastic rounding, observers and packed tensors: what they
accept, what they reject, and what they promise."""
import dataclasses

import pytest
import torch

from alphaquant.packed import PackedTensor
from alphaquant.quantizers import (FP4Config, FP8Config, INT4Config, INT4Quantizer, INT8Config,
                                   INT8Quantizer, MinMaxObserver, NF4Config, MovingAverageMinMaxObserver, MSEObserver,
                                   PercentileObserver, QuantizerConfig)
from alphaquant.quantizers.registry import create_quantizer_from_scheme, lookup


# ---------------------------------------------------------------- stochastic rounding

def _stochastic_int8(seed=None):
    return INT8Quantizer(INT8Config(granularity="per_tensor", stochastic=True, seed=seed, dtype="float32"))


def test_stochastic_rounding_is_unbiased_across_calls():
    # Values between grid points (scale = 1: max 127), so rounding to nearest would be off by up to 0.5.
    x = torch.tensor([[127.0, 0.3, -2.7, 10.5, 55.9, -0.1, 3.25, -100.75]])
    q = _stochastic_int8()
    calls = torch.stack([q.quantize_activation(x) for _ in range(2000)])
    assert len({tuple(c.flatten().tolist()) for c in calls[:20]}) > 1  # fresh randomness per call
    mean = calls.mean(0)
    assert (mean - x).abs().max().item() < 0.05, (mean - x)
    # Each value only ever rounds to one of its two neighbours.
    assert ((calls - x).abs() < 1).all()


def test_manual_seed_repeats_a_run():
    q = _stochastic_int8()
    x = torch.randn(16, 64) * 3
    torch.manual_seed(123)
    first = [q.quantize_activation(x) for _ in range(3)]
    torch.manual_seed(123)
    second = [q.quantize_activation(x) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])


def test_explicit_seed_is_reproducible_per_call():
    q = _stochastic_int8(seed=7)
    x = torch.randn(16, 64) * 3
    assert torch.equal(q.quantize_activation(x), q.quantize_activation(x))
    w = INT4Quantizer(INT4Config(stochastic=True, seed=7, group_size=32))
    assert torch.equal(w.quantize_weight(x).data, w.quantize_weight(x).data)


def test_stochastic_weight_quantization_draws_fresh_bits():
    w = INT4Quantizer(INT4Config(stochastic=True, group_size=32))
    x = torch.randn(16, 64)
    assert not torch.equal(w.quantize_weight(x).data, w.quantize_weight(x).data)


# ---------------------------------------------------------------- registry

@pytest.mark.parametrize("name,base,fmt", [("int8", INT8Config, "int8"), ("fp8", FP8Config, "fp8_e4m3"),
                                           ("fp8_e5m2", FP8Config, "fp8_e5m2"), ("fp4", FP4Config, "fp4_e2m1"),
                                           ("nf4", NF4Config, "nf4")])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_registry_hands_out_config_classes(name, base, fmt, dtype):
    (WQ, WCfg), (AQ, ACfg) = create_quantizer_from_scheme({"wq": name, "aq": "none"}, dtype)
    assert (AQ, ACfg) == (None, None)
    assert isinstance(WCfg, type) and issubclass(WCfg, base) and issubclass(WCfg, QuantizerConfig)
    assert WCfg.__name__ == base.__name__
    names = [f.name for f in dataclasses.fields(WCfg)]
    assert names == [f.name for f in dataclasses.fields(base)]
    cfg = WCfg()
    assert isinstance(cfg, WCfg) and cfg.dtype == dtype
    assert WQ(cfg).fmt == fmt
    assert WCfg(group_size=32).group_size == 32  # other fields pass as usual
    with pytest.raises(ValueError, match="group_size"):
        WCfg(group_size=0)  # validation is inherited


def test_registry_fixed_format_is_a_default_and_classes_are_cached():
    _, cfg = lookup("fp8_e5m2")
    assert cfg().format == "e5m2" and cfg(format="e4m3").format == "e4m3"
    assert lookup("fp8_e5m2")[1] is cfg
    assert lookup("int4")[1] is INT4Config  # nothing to change: the class itself


def test_registry_rejects_non_names():
    for bad in (["int4"], 4, {"a": 1}):
        with pytest.raises(ValueError, match="unknown quantizer"):
            lookup(bad)


# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize("kwargs,match", [
    ({"clip_search": "no"}, "clip_search must be True or False"),
    ({"zero_opt": 1, "symmetric": False}, "zero_opt must be True or False"),
    ({"seed": "1"}, "seed must be None"),
    ({"seed": -1}, "seed must be None"),
    ({"seed": True}, "seed must be None"),
    ({"stochastic": 1}, "stochastic must be True or False"),
    ({"group_size": 2**40}, "group_size must be a positive int"),
    ({"symmetric": "yes"}, "symmetric must be True or False"),
    ({"zero_opt": True}, "zero_opt refines zero points, which only asymmetric integer formats"),
    ({"zero_opt": True, "clip_search": True, "symmetric": False}, "clip_search and zero_opt .* pick one"),
])
def test_config_fields_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        INT4Config(**kwargs)


def test_zero_opt_needs_an_asymmetric_int_format():
    with pytest.raises(ValueError, match="only asymmetric integer formats"):
        FP8Config(zero_opt=True)
    INT4Config(symmetric=False, zero_opt=True)  # fine


# ---------------------------------------------------------------- observers

@pytest.mark.parametrize("make", [MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MSEObserver])
def test_per_tensor_observers_take_batches_of_any_shape(make):
    q = INT8Quantizer(INT8Config(granularity="per_tensor"))
    obs = make()
    q.attach_observer(obs)
    obs.observe(torch.randn(4, 16))
    obs.observe(torch.randn(3, 5, 32) * 2)
    obs.observe(torch.randn(7))
    q.calibrate_finish()
    assert q.static_scale.shape == (1,) and torch.isfinite(q.static_scale).all() and (q.static_scale > 0).all()


def test_mse_observer_per_channel_with_several_batches():
    q = INT8Quantizer(INT8Config(granularity="per_channel"))
    obs = MSEObserver()
    q.attach_observer(obs)
    for _ in range(3):
        obs.observe(torch.randn(6, 32))
    q.calibrate_finish()
    assert q.static_scale.shape == (6, 1)


@pytest.mark.parametrize("kwargs,match", [({"grid": 0}, "grid must be an int >= 1"), ({"grid": -3}, "grid"),
                                          ({"grid": 2.5}, "grid"), ({"min_ratio": 0}, "min_ratio"),
                                          ({"min_ratio": 1.5}, "min_ratio"), ({"max_rows": 0}, "max_rows")])
def test_mse_observer_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MSEObserver(**kwargs)


def test_observer_rejects_non_float_input():
    obs = MinMaxObserver()
    with pytest.raises(TypeError, match="floating tensor"):
        obs.observe(torch.ones(4, 4, dtype=torch.int32))


def test_observer_scales_of_a_range_near_the_float32_limit():
    from alphaquant.quantizers.observers import scales_from_range

    big = torch.finfo(torch.float32).max
    scale, zero = scales_from_range(torch.tensor([-big]), torch.tensor([big]), "int8", symmetric=False)
    assert torch.isfinite(scale).all() and (scale > 0).all() and torch.isfinite(zero).all()
    assert abs(scale.item() - 2 * (big / 255)) / scale.item() < 1e-6


# ---------------------------------------------------------------- packed tensors

def test_packed_tensor_to_moves_but_never_casts():
    p = INT4Quantizer(INT4Config(group_size=32)).quantize_weight(torch.randn(8, 70))
    with pytest.raises(TypeError, match="cannot cast .* use .dequantize"):
        p.to(torch.float16)
    moved = p.to("cpu")
    assert torch.equal(moved.data, p.data) and moved.data.dtype == torch.uint8


def test_packed_tensor_checks_its_parts():
    p = INT4Quantizer(INT4Config(group_size=32)).quantize_weight(torch.randn(8, 70))
    with pytest.raises(ValueError, match="scale has shape"):
        PackedTensor(p.data, p.scale[:, :2], None, "int4", True, 32, (8, 70))
    with pytest.raises(ValueError, match="unknown format"):
        PackedTensor(p.data, p.scale, None, "int5x", True, 32, (8, 70))
    with pytest.raises(TypeError, match="uint8"):
        PackedTensor(p.data.float(), p.scale, None, "int4", True, 32, (8, 70))


def test_int_torch_module_path_aliases_the_ops():
    from alphaquant import ops
    from alphaquant.quantizers.kernel.int_torch import int_dequantize, int_fake_quantize, int_quantize

    x = torch.randn(5, 40)
    packed, scale, zero = int_quantize(x, 4, symmetric=False, group_size=16)
    expected = ops.quantize(x, "int4", symmetric=False, group_size=16)
    assert all(torch.equal(a, b) for a, b in zip((packed, scale, zero), expected))
    deq = int_dequantize(packed, scale, zero, 4, 40, symmetric=False, group_size=16)
    assert torch.equal(deq, int_fake_quantize(x, 4, symmetric=False, group_size=16))
