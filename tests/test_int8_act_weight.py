"""QuantLinear's int8-activation layout held in place of weight_packed (alphaquant/nn/int8_act_weight.py):
the codes are held once, and every way of reaching the packed weight still sees (and changes) it."""
import copy
import io

import pytest
import torch
from torch import nn

from alphaquant import ops
from alphaquant.nn import QuantLinear
from alphaquant.plans import apply_plan


def _model(fmt="int4", group_size=32, **scheme):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40))
    sizes = {"group_size": group_size} if group_size else {}
    apply_plan(model, {"default": {"wq": fmt, **sizes, "act_int8": True, **scheme}, "overrides": []})
    return model


def _run(model, x):
    with torch.no_grad():
        return model(x)


def _held_bytes(layer):
    """Bytes of the tensors the layer holds: its buffers and its layout."""
    held = {id(t): t for t in layer._buffers.values() if t is not None}
    if layer._int8_act_weight is not None:
        layout = layer._int8_act_weight
        held.update({id(t): t for t in (layout.codes, layout.params) + (layout.patch or ())})
    return sum(t.nbytes for t in held.values())


@pytest.mark.parametrize("fmt,group_size,scheme", [("int4", 32, {}), ("int4", 32, {"symmetric": False}),
                                                   ("int2", 64, {"symmetric": False}), ("int8", 32, {}),
                                                   ("fp4_e2m1", 32, {}), ("nvfp4", 16, {}), ("mxfp6_e2m3", 32, {}),
                                                   ("int6", 0, {"granularity": "per_channel"}),
                                                   ("int8", 0, {"granularity": "per_tensor"}),
                                                   ("int4", 32, {"scale_dtype": "float16"}),
                                                   ("int4", 64, {"scale_dtype": "bfloat16", "symmetric": False})])
def test_codes_are_held_once(fmt, group_size, scheme):
    model = _model(fmt, group_size, **scheme)
    layer = model[0]
    before = _held_bytes(layer)
    packed, state = layer.weight_packed.clone(), copy.deepcopy(model.state_dict())
    x = torch.randn(3, 64)
    y = _run(model, x)
    assert "weight_packed" not in layer._buffers and "weight_packed" in layer._in_layout
    layout = layer._int8_act_weight
    # float scales are the params' first entries: let go too (MX and nvfp4 scale bytes are not)
    assert ("weight_scale" in layer._in_layout) == (fmt not in ("mxfp6_e2m3", "nvfp4"))
    dropped = sum(state[f"0.{name}"].nbytes for name in layer._in_layout)
    # the layout's codes and params (and the patch's codes) in place of the buffers let go
    assert _held_bytes(layer) == before - dropped + sum(t.nbytes for t in (layout.codes, layout.params)
                                                        + (layout.patch or ()))
    after = model.state_dict()
    assert list(after) == list(state)
    for key in state:
        assert torch.equal(after[key], state[key]), key
    assert torch.equal(layer.weight_packed, packed)  # rebuilt exactly when asked for
    assert [n for n, t in layer._buffers.items() if t is not None] == [k[2:] for k in state if k.startswith("0.")]
    assert torch.equal(_run(model, x), y)
    assert list(model.state_dict()) == list(state)


def test_writes_through_the_rebuilt_buffer_reach_the_weight():
    model = _model()
    layer, x = model[0], torch.randn(3, 64)
    y = _run(model, x)
    layer.weight_packed.zero_()  # code 0 of symmetric int4: -8 * scale everywhere
    assert "weight_packed" in layer._buffers
    want = ops.linear(x, torch.zeros_like(layer.weight_packed), layer.weight_scale, None, layer.bias, "int4",
                      symmetric=True, group_size=32, k=64)
    got = _run(layer, x)
    assert not torch.equal(got, y[:, :96])
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.3)  # int8 activations against float ones


def test_a_held_reference_keeps_the_buffer():
    model = _model()
    layer, x = model[0], torch.randn(3, 64)
    held = layer.weight_packed
    sd = model.state_dict()  # shares the buffer's storage
    _run(model, x)
    assert "weight_packed" in layer._buffers and layer.weight_packed is held
    sd["0.weight_packed"].fill_(0x88)  # codes 8: zero weights; through the state_dict, as torch allows
    torch.testing.assert_close(_run(layer, x), layer.bias.expand(3, -1))
    del held, sd
    _run(model, x)
    assert "weight_packed" not in layer._buffers  # nothing else holds it now
    assert bool((layer.weight_packed == 0x88).all())


def test_assigning_a_new_packed_tensor():
    model = _model()
    layer, x = model[0], torch.randn(3, 64)
    _run(model, x)
    layer.weight_packed = torch.full_like(layer.weight_packed, 0x88)
    assert "weight_packed" in layer._buffers and "weight_packed" not in layer._in_layout
    torch.testing.assert_close(_run(layer, x), layer.bias.expand(3, -1))


def test_float_path_moves_copies_and_loads_after_the_buffer_is_let_go():
    model = _model()
    x = torch.randn(3, 64)
    y = _run(model, x)
    float_y = model(x.clone().requires_grad_())  # a gradient: the float-activation path reads weight_packed
    assert float_y.requires_grad and not torch.equal(float_y.detach(), y)
    _run(model, x)
    assert "weight_packed" not in model[0]._in_layout  # the autograd graph holds the packed tensor
    del float_y
    _run(model, x)
    clone = copy.deepcopy(model)
    assert "weight_packed" in clone[0]._in_layout and torch.equal(_run(clone, x), y)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(_run(torch.load(buf, weights_only=False), x), y)
    half = copy.deepcopy(model).to(torch.bfloat16)  # converts the scales and bias; the codes come back first
    torch.testing.assert_close(_run(half, x.bfloat16()).float(), y, rtol=0.05, atol=0.1)
    other = _model()
    for m in other:
        if isinstance(m, QuantLinear):
            m.weight_scale.mul_(2)
    _run(model, x)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(_run(model, x), _run(other, x))


def test_scale_changes_rebuild_the_params():
    model = _model()
    layer, x = model[2], torch.randn(3, 96)
    before = _run(layer, x)
    assert "weight_packed" in layer._in_layout
    with torch.no_grad():
        layer.weight_scale.mul_(2)
    torch.testing.assert_close(_run(layer, x) - layer.bias, 2 * (before - layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp6_e2m3", "mxfp6_e2m3"])
def test_negative_zero_codes(fmt):
    # E2M3's -0 and +0 share a grid value: the layout gives -0 back as +0, so its positions are kept
    # aside; a weight with many of them keeps its packed bytes instead
    packed, scale, _ = ops.quantize(torch.randn(96, 64), fmt, symmetric=True, group_size=32)
    layer = QuantLinear(64, 96, True, fmt, True, 32, scale_dtype=scale.dtype, scheme={"act_int8": True})
    x = torch.randn(2, 64)
    with torch.no_grad():
        layer.weight_scale.copy_(scale)
    model = nn.Sequential(layer)
    codes = ops.unpack(packed, 6, 64)
    codes[codes == 0b100000] = 0
    codes[0, :3] = 0b100000
    codes[5, 63] = 0b100000
    layer.weight_packed.copy_(ops.pack(codes, 6))
    want = layer.weight_packed.clone()
    _run(model, x)
    assert "weight_packed" in layer._in_layout and torch.equal(layer.weight_packed, want)
    assert torch.equal(model.state_dict()["0.weight_packed"], want)
    codes[:, ::2] = 0b100000
    layer.weight_packed = ops.pack(codes, 6)
    _run(model, x)
    assert "weight_packed" in layer._buffers and torch.equal(ops.unpack(layer.weight_packed, 6, 64), codes)


def test_set_padding_bits_keep_the_packed_buffer():
    lin = QuantLinear(60, 16, False, "int6", True, 0, scheme={"act_int8": True})  # 60 * 6 = 360 bits: 45 bytes
    with torch.no_grad():
        lin.weight_scale.fill_(0.1)
        lin.weight_packed.copy_(torch.randint(0, 256, lin.weight_packed.shape, dtype=torch.uint8))
    _run(lin, torch.randn(2, 60))
    assert "weight_packed" in lin._in_layout  # 45 bytes hold 60 codes exactly: nothing to pad
    lin = QuantLinear(61, 16, False, "int6", True, 0, scheme={"act_int8": True})  # 366 bits: 2 bits of padding
    with torch.no_grad():
        lin.weight_scale.fill_(0.1)
        lin.weight_packed.fill_(0xFF)
    want = lin.weight_packed.clone()
    _run(lin, torch.randn(2, 61))
    assert "weight_packed" in lin._buffers and torch.equal(lin.weight_packed, want)


def test_keep_packed_beside_layout():
    model = _model()
    model[0].keep_packed_beside_layout = True
    _run(model, torch.randn(2, 64))
    assert "weight_packed" in model[0]._buffers and "weight_packed" not in model[2]._buffers


def test_inference_mode_then_load():
    model, other = _model(), _model("int4", 32, symmetric=False)
    model2 = _model("int4", 32, symmetric=False)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        model2(x)
    assert "weight_packed" in model2[0]._in_layout
    model2.load_state_dict(other.state_dict())  # outside inference mode: the rebuilt buffer takes writes
    torch.testing.assert_close(_run(model2, x), _run(other, x))
    del model


def test_each_buffer_is_judged_alone():
    model = _model()
    layer, x = model[0], torch.randn(3, 64)
    scale = layer.weight_scale  # held: stays a buffer; the packed codes still go
    _run(model, x)
    assert layer._in_layout == ("weight_packed",) and layer.weight_scale is scale
    with torch.no_grad():
        scale.mul_(2)  # through the held tensor: the layout follows
    torch.testing.assert_close(_run(layer, x) - layer.bias, 2 * (_run(_model()[0], x) - layer.bias),
                               rtol=1e-5, atol=1e-5)
