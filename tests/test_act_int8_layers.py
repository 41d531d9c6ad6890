"""act_int8 in QuantLinear and plans: layers compute through linear_int8_act on the CPU, train and
run elsewhere through the float-activation op, and plans refuse what the path cannot take."""
import pytest
import torch
from torch import nn

from alphaquant import ops, reference as ref
from alphaquant.checkpoint_file import load_quantized, save_quantized
from alphaquant.nn import QuantLinear
from alphaquant.plans import PlanError, apply_plan


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40))


def _plan(**scheme):
    return {"default": {"wq": "int4", "group_size": 32, **scheme}, "overrides": []}


def test_layer_uses_the_int8_path_and_falls_back_for_gradients():
    model = _model()
    apply_plan(model, _plan(act_int8=True, symmetric=False))
    layer = model[0]
    assert isinstance(layer, QuantLinear) and layer.act_int8 and "act_int8=True" in repr(layer)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = layer(x)
    p = layer.packed_weight
    want = ref.linear_int8_act(x, p.data, p.scale, p.zero_point, layer.bias, "int4", False, 32, 64)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    float_path = ops.linear(x, p.data, p.scale, p.zero_point, layer.bias, "int4", symmetric=False, group_size=32,
                            k=64)
    assert not torch.equal(y, float_path)  # the activations were quantized
    xg = x.clone().requires_grad_()
    yg = layer(xg)  # a gradient is needed: the float-activation path, which has one
    torch.testing.assert_close(yg, float_path)
    yg.sum().backward()
    assert xg.grad is not None


def test_layout_follows_weight_changes():
    model = _model()
    apply_plan(model, _plan(act_int8=True))
    layer = model[2]
    x = torch.randn(3, 96)
    with torch.no_grad():
        before = layer(x)
        layer.weight_scale.mul_(2)  # in place: the cached layout must be rebuilt
        after = layer(x)
    torch.testing.assert_close(after - layer.bias, 2 * (before - layer.bias), rtol=1e-5, atol=1e-5)


def test_layers_built_under_inference_mode():
    """Buffers made under inference_mode have no version counter: the layer still runs, and a
    load_state_dict into it (in place, unseen by versions) rebuilds the layout."""
    with torch.inference_mode():
        model = _model()
        apply_plan(model, _plan(act_int8=True))
        other = _model()
        for m in other:
            if isinstance(m, nn.Linear):
                m.weight.mul_(3)
        apply_plan(other, _plan(act_int8=True))
        x = torch.randn(3, 64)
        model(x)  # layouts built from the first weights
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x), other(x))


def test_act_int8_survives_a_checkpoint(tmp_path):
    model = _model()
    plan = _plan(act_int8=True, scale_dtype="float16")
    apply_plan(model, plan)
    path = str(tmp_path / "m.safetensors")
    save_quantized(model, path, plan)
    loaded = load_quantized(_model(), path)
    assert all(m.act_int8 for m in loaded.modules() if isinstance(m, QuantLinear))
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("scheme,match", [
    (dict(wq="nf4"), "integer grid"),
    (dict(wq="int4", group_size=8), "multiple of 32"),
    (dict(wq="int8", aq="int8"), "leave 'aq' unset"),
    (dict(act_int8="yes"), "must be true or false"),
])
def test_plans_refuse_what_the_path_cannot_take(scheme, match):
    plan = {"default": {"group_size": 32, "act_int8": True, **scheme}, "overrides": []}
    with pytest.raises(PlanError, match=match):
        apply_plan(_model(), plan)


def test_per_channel_and_cpu_presets():
    from alphaquant.cli.presets import resolve_plan

    model = _model()
    apply_plan(model, {"default": {"wq": "int8", "granularity": "per_channel", "act_int8": True}, "overrides": []})
    with torch.no_grad():
        assert model(torch.randn(2, 64)).shape == (2, 40)
    for name in ("cpu_q4_0", "cpu_q8_0"):
        _, plan = resolve_plan(name)
        m = _model()
        apply_plan(m, plan)
        assert all(q.act_int8 for q in m.modules() if isinstance(q, QuantLinear))


def test_compiles_with_and_without_a_built_layout():
    model = _model()
    apply_plan(model, _plan(act_int8=True))
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch._dynamo.reset()
        y = torch.compile(model)(x)  # the layout is built inside the compiled call
        want = model(x)
        torch.testing.assert_close(y, want)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), want)  # built: no graph break


@pytest.mark.parametrize("scheme", [dict(wq="nvfp4", group_size=16), dict(wq="int4", group_size=16)])
def test_16_value_groups_take_the_int8_path(scheme):
    # nvfp4 (E2M1 values, a scale per 16) and 16-value integer groups: two weight groups per
    # activation block of 32
    model = _model()
    apply_plan(model, _plan(act_int8=True, **scheme))
    layer = model[0]
    assert layer._int8_act_applies(torch.randn(2, 64))
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = layer(x)
    p = layer.packed_weight
    want = ref.linear_int8_act(x, p.data, p.scale, p.zero_point, layer.bias, layer.fmt, True, 16, 64)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
