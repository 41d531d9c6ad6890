"""One-byte zero points: uint8 codes c for z = c * 2^(b-7) - 2^(b-1) (csrc/include/alphaquant/formats.h),
taken by every op that takes zero points, and stored by quantizers with zero_point="byte"."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from alphaquant import ops, reference
from alphaquant.formats import decode_zero_points, encode_zero_points, zero_grid
from alphaquant.plans import PlanError, apply_plan, load_plan
from alphaquant.quantizers import INT2Config, INT2Quantizer, INT4Config, INT4Quantizer, INT8Config, INT8Quantizer
from conftest import DEVICES


def test_the_grid_holds_every_integer_zero_point_and_decodes_exactly():
    for bits in range(1, 9):
        step, low, high = zero_grid(bits)
        assert step == 2.0 ** (bits - 7) and low == -(2.0 ** (bits - 1)) and high == low + 255 * step
        codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
        z = decode_zero_points(codes, bits)
        assert torch.equal(encode_zero_points(z, bits), codes)  # every code round trips
        ints = torch.arange(0, 2 ** bits, dtype=torch.float32)
        if step <= 1:
            assert torch.equal(decode_zero_points(encode_zero_points(ints, bits), bits), ints)
    assert zero_grid(4) == (0.125, -8.0, 23.875)
    # off-grid values round to the nearest point; beyond the grid they clamp
    assert decode_zero_points(encode_zero_points(torch.tensor([3.06, 3.07, -100.0, 100.0]), 4), 4).tolist() == \
        [3.0, 3.125, -8.0, 23.875]


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), k=st.integers(1, 150), group=st.sampled_from([0, 7, 32, 64]),
       bits=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 2**31 - 1))
def test_ops_take_byte_zero_points_as_their_decoded_floats(rows, k, group, bits, seed, device):
    g = torch.Generator().manual_seed(seed)
    fmt = f"int{bits}"
    x = (torch.randn(rows, k, generator=g) + torch.randn((), generator=g)).to(device)
    packed, s, _ = ops.quantize(x, fmt, symmetric=False, group_size=group)
    zb = torch.randint(0, 256, tuple(s.shape), generator=g, dtype=torch.int64).to(torch.uint8).to(device)
    zf = decode_zero_points(zb, bits)
    # dequantize / quantize / linear / embedding with uint8 zero points equal those with their floats,
    # bit for bit, and the pure-PyTorch reference
    d = ops.dequantize(packed, s, zb, fmt, symmetric=False, group_size=group, k=k)
    assert torch.equal(d, ops.dequantize(packed, s, zf, fmt, symmetric=False, group_size=group, k=k))
    assert torch.equal(d.cpu(), reference.dequantize(packed.cpu(), s.cpu(), zb.cpu(), fmt, False, group, k))
    pb, sb, zout = ops.quantize(x, fmt, symmetric=False, group_size=group, scale=s, zero_point=zb)
    assert torch.equal(zout, zf)  # returned as float32 values
    assert torch.equal(pb, ops.quantize(x, fmt, symmetric=False, group_size=group, scale=s, zero_point=zf)[0])
    assert torch.equal(pb.cpu(), reference.quantize(x.cpu(), fmt, False, group, s.cpu(), zb.cpu())[0])
    a = torch.randn(3, k, generator=g).to(device)
    y = ops.linear(a, packed, s, zb, None, fmt, symmetric=False, group_size=group, k=k)
    assert torch.equal(y, ops.linear(a, packed, s, zf, None, fmt, symmetric=False, group_size=group, k=k))
    idx = torch.randint(0, rows, (5,), generator=g).to(device)
    e = ops.embedding(idx, packed, s, zb, fmt, symmetric=False, group_size=group, k=k)
    assert torch.equal(e, d[idx])


def test_other_integer_zero_points_are_refused_clearly():
    x = torch.randn(4, 32)
    packed, s, z = ops.quantize(x, "int4", symmetric=False, group_size=16)
    for bad in (z.to(torch.int32), z.to(torch.int8)):
        with pytest.raises(TypeError, match=r"zero_point must be a floating tensor or uint8 \(one-byte zero points\)"):
            ops.dequantize(packed, s, bad, "int4", symmetric=False, group_size=16, k=32)
        with pytest.raises(TypeError, match="or uint8"):
            ops.quantize(x, "int4", symmetric=False, group_size=16, scale=s, zero_point=bad)
    with pytest.raises(TypeError, match="scale must be a floating tensor; got"):
        ops.dequantize(packed, s.to(torch.uint8), z, "int4", symmetric=False, group_size=16, k=32)
    with pytest.raises(ValueError, match="zero_point has shape"):
        ops.dequantize(packed, s, torch.zeros(4, 3, dtype=torch.uint8), "int4", symmetric=False, group_size=16, k=32)


@pytest.mark.parametrize("cls,cfg,bits", [(INT2Quantizer, INT2Config, 2), (INT4Quantizer, INT4Config, 4),
                                          (INT8Quantizer, INT8Config, 8)])
@pytest.mark.parametrize("zero_opt", [False, True])
def test_byte_zero_point_quantizers_store_one_byte_and_stay_accurate(cls, cfg, bits, zero_opt):
    torch.manual_seed(bits)
    w = torch.randn(37, 100) * 0.05 + 0.01  # odd rows, a short last group
    kw = dict(symmetric=False, group_size=32, scale_dtype="float16", dtype="float32", zero_opt=zero_opt)
    byte = cls(cfg(zero_point="byte", **kw)).quantize_weight(w)
    plain = cls(cfg(**kw)).quantize_weight(w)
    assert byte.zero_point.dtype == torch.uint8 and byte.scale.dtype == torch.float16
    assert plain.nbytes - byte.nbytes == byte.zero_point.numel()  # one byte per group instead of two
    d = byte.dequantize(torch.float32) - w
    # a grid point next to the chosen zero point moves the range by at most one grid step
    step = zero_grid(bits)[0]
    s = byte.scale.float().repeat_interleave(32, -1)[:, :100]
    assert (d.abs() <= (0.5 + step + 2 ** (bits - 11)) * s).all()
    if bits <= 4:  # steps of 1/8 of a code and finer cost next to nothing; int8's steps are 2 codes
        assert d.pow(2).mean() <= 1.05 * (plain.dequantize(torch.float32) - w).pow(2).mean()
    # what is stored is exactly what was computed with: packing again with it gives the same codes
    z = decode_zero_points(byte.zero_point, bits)
    again = cls(cfg(zero_point="byte", **kw)).pack_with_scales(w, byte.scale.float(), z)
    assert torch.equal(again.data, byte.data) and torch.equal(again.zero_point, byte.zero_point)


def test_ranges_beyond_the_grid_widen_the_scale_instead_of_clipping():
    torch.manual_seed(0)
    # groups far from 0 (zero points below -8 or above 23.875 codes for int4) keep their range
    w = torch.cat([torch.rand(2, 64) + 40.0, -torch.rand(2, 64) - 40.0, torch.randn(2, 64)])
    p = INT4Quantizer(INT4Config(symmetric=False, zero_point="byte", group_size=64, scale_dtype="float16",
                                 dtype="float32")).quantize_weight(w)
    err = (p.dequantize(torch.float32) - w).abs().amax(-1)
    assert (err <= 0.51 * p.scale.float().squeeze(-1) + 1e-3).all(), err


def test_byte_zero_points_need_an_asymmetric_int_format():
    with pytest.raises(ValueError, match="needs symmetric=False"):
        INT4Config(symmetric=True, zero_point="byte")
    with pytest.raises(PlanError, match="zero_point 'byte' needs"):
        load_plan({"default": {"wq": "int4", "zero_point": "byte"}})


@pytest.mark.parametrize("device", DEVICES)
def test_a_byte_zero_point_plan_holds_uint8_buffers_and_loads_from_its_state_dict(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 64), torch.nn.Linear(64, 24)).to(device)
    plan = {"default": {"wq": "int4", "symmetric": False, "zero_opt": True, "zero_point": "byte", "group_size": 32,
                        "scale_dtype": "float16", "dtype": "float32"}, "overrides": [{"pattern": "0"}]}
    x = torch.randint(0, 50, (3, 7), device=device)
    ref = model(x)
    apply_plan(model, plan)
    for m in model:
        assert m.weight_zero_point.dtype == torch.uint8 and m.weight_scale.dtype == torch.float16
    y = model(x)
    assert (y - ref).abs().max() < 0.2 * ref.abs().max()
    fresh = torch.nn.Sequential(torch.nn.Embedding(50, 64), torch.nn.Linear(64, 24)).to(device)
    apply_plan(fresh, plan, quantize_weights=False)
    assert fresh[1].weight_zero_point.dtype == torch.uint8
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), y)
    # module dtype casts leave the codes alone
    assert model.half()[1].weight_zero_point.dtype == torch.uint8


def test_exports_read_the_decoded_zero_points(tmp_path):
    from alphaquant.export import ExportError, to_compressed_tensors

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 24))
    apply_plan(model, {"default": {"wq": "int4", "symmetric": False, "zero_point": "byte", "group_size": 32,
                                   "scale_dtype": "float16", "dtype": "float32"}})
    z = model[0].float_zero_points()
    assert torch.equal(z, decode_zero_points(model[0].weight_zero_point, 4))
    # compressed-tensors stores integer zero points in the code range: eighths of a code do not export
    assert not torch.equal(z, z.round())
    with pytest.raises(ExportError, match="not integers in the code range"):
        to_compressed_tensors(model, str(tmp_path / "ct"))
