"""MX block formats (OCP MX v1.0): E8M0 scale bytes, saturated elements, against the reference,
ml_dtypes' element and E8M0 types, and torchao's MX reference code."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from alphaquant import ops, reference
from alphaquant.formats import MX_ELEMENTS, MX_FORMATS
from conftest import DEVICES

ml_dtypes = pytest.importorskip("ml_dtypes")

EMAX = {f: e for f, (_, e) in MX_ELEMENTS.items()}


def data(rows, k, seed, spread):
    """Values over many binades per block (spread), zeros and exact powers of two mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.exp2(torch.randint(-spread, spread + 1, (rows, k), generator=g).float())
    x[torch.rand(rows, k, generator=g) < 0.05] = 0.0
    x[torch.rand(rows, k, generator=g) < 0.05] = 2.0 ** torch.randint(-12, 12, (1,), generator=g).item()
    return x


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), k=st.integers(1, 200), fmt=st.sampled_from(MX_FORMATS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), spread=st.integers(0, 12),
       stochastic=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernels_match_the_reference_bit_for_bit(rows, k, fmt, dtype, spread, stochastic, seed, device):
    x = data(rows, k, seed, spread if dtype != torch.float16 else min(spread, 4)).to(dtype)
    packed, scale, zero = ops.quantize(x.to(device), fmt, symmetric=True, group_size=32, stochastic=stochastic,
                                       seed=seed)
    rp, rs, _ = reference.quantize(x, fmt, True, 32, stochastic=stochastic, seed=seed)
    assert scale.dtype == torch.uint8 and scale.shape == (rows, -(-k // 32)) and zero.numel() == 0
    assert torch.equal(scale.cpu(), rs) and torch.equal(packed.cpu(), rp)
    deq = ops.dequantize(packed, scale, None, fmt, symmetric=True, group_size=32, k=k)
    assert torch.equal(deq.cpu(), reference.dequantize(rp, rs, None, fmt, True, 32, k))
    fake = ops.fake_quantize(x.to(device), fmt, symmetric=True, group_size=32, stochastic=stochastic, seed=seed)
    assert torch.equal(fake.cpu(), reference.fake_quantize(x, fmt, True, 32, stochastic=stochastic, seed=seed))
    again = ops.quantize(x.to(device), fmt, symmetric=True, group_size=32, scale=scale)  # static: the same bits
    assert torch.equal(again[0], packed) or stochastic
    w = torch.randn(3, k, generator=torch.Generator().manual_seed(seed)).to(device)
    want = reference.linear(w, rp, rs, None, None, fmt, True, 32, k)
    bound = (w.abs().cpu() @ reference.dequantize(rp, rs, None, fmt, True, 32, k).abs().t()).max()
    torch.testing.assert_close(ops.linear(w, packed, scale, None, None, fmt, symmetric=True, group_size=32, k=k).cpu(),
                               want, rtol=0, atol=float(1e-5 * bound) + 1e-30)  # float32 sums in another order


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_scales_and_elements_are_ml_dtypes_casts(fmt):
    """E8M0 byte = ml_dtypes' float8_e8m0fnu of 2^(floor(log2 amax) - emax); element = ml_dtypes'
    round-to-nearest-even cast of x / X after saturation."""
    x = data(7, 96, 3, 10)
    packed, scale, _ = ops.quantize(x, fmt, symmetric=True, group_size=32)
    amax = x.reshape(7, 3, 32).abs().amax(-1).numpy()
    e = np.clip(np.floor(np.log2(np.where(amax > 0, amax, 2.0**-127))) - EMAX[fmt], -127, 127)
    want_scale = np.exp2(e).astype(np.float32).astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
    assert np.array_equal(scale.numpy(), want_scale)
    element = MX_ELEMENTS[fmt][0]
    scaled = (x.reshape(7, 3, 32).numpy() / np.exp2(e)[..., None].astype(np.float32)).reshape(7, 96)
    if element == "int8":
        want = np.clip(np.rint(scaled * 64), -128, 127) * np.float32(2.0**-6)  # q * 2^-6
    else:
        t = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2,
             "fp6_e3m2": ml_dtypes.float6_e3m2fn, "fp6_e2m3": ml_dtypes.float6_e2m3fn,
             "fp4_e2m1": ml_dtypes.float4_e2m1fn}[element]
        m = float(ml_dtypes.finfo(t).max)
        want = np.clip(scaled, -m, m).astype(t).astype(np.float32)
    x_blocks_scale = np.repeat(np.exp2(e), 32, axis=-1).astype(np.float32)
    deq = ops.dequantize(packed, scale, None, fmt, symmetric=True, group_size=32, k=96).numpy()
    assert np.array_equal(deq, want * x_blocks_scale)


@pytest.mark.parametrize("fmt", [f for f in MX_FORMATS if f != "mxint8"])  # torchao has no MX int8 yet
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchao_mx_reference_gives_the_same_scales_and_values(fmt, dtype):
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    elem = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2, "mxfp6_e3m2": "fp6_e3m2",
            "mxfp6_e2m3": "fp6_e2m3", "mxfp4_e2m1": torch.float4_e2m1fn_x2}[fmt]
    x = data(8, 128, 11, 8).to(dtype)  # torchao needs whole blocks, and scales of 2^-126 or more (its clamp)
    scale_e8m0, data_lp = mx.to_mx(x, elem, 32)
    theirs = mx.to_dtype(data_lp, scale_e8m0, elem, 32, torch.float32)
    packed, scale, _ = ops.quantize(x, fmt, symmetric=True, group_size=32)
    assert torch.equal(scale, scale_e8m0.view(torch.uint8).reshape(8, 4))
    assert torch.equal(ops.dequantize(packed, scale, None, fmt, symmetric=True, group_size=32, k=128), theirs)


def test_saturation_all_zero_blocks_and_tiny_values():
    big = torch.tensor([[1.9 * 2**15] + [1.0] * 31])  # x / X rounds past e5m2's largest: saturates, no Inf
    p, s, _ = ops.quantize(big, "mxfp8_e5m2", symmetric=True, group_size=32)
    d = ops.dequantize(p, s, None, "mxfp8_e5m2", symmetric=True, group_size=32, k=32)
    assert torch.isfinite(d).all() and d[0, 0] == 57344.0 * 2.0 ** (int(s[0, 0]) - 127)
    zeros = torch.zeros(2, 40)
    p, s, _ = ops.quantize(zeros, "mxfp4_e2m1", symmetric=True, group_size=32)
    assert (s == 0).all()  # 2^-127: E8M0's smallest
    assert (ops.dequantize(p, s, None, "mxfp4_e2m1", symmetric=True, group_size=32, k=40) == 0).all()
    tiny = torch.full((1, 32), 2.0**-130)  # a float32 subnormal: the scale saturates at 2^-127 (mxint8: 2^-133)
    p, s, _ = ops.quantize(tiny, "mxint8", symmetric=True, group_size=32)
    assert int(s[0, 0]) == 0
    d = ops.dequantize(p, s, None, "mxint8", symmetric=True, group_size=32, k=32)
    assert torch.equal(d, reference.dequantize(p, s, None, "mxint8", True, 32, 32))
    assert (d == 2.0**-130).all()  # q = 8 steps of the subnormal scale 2^-133: exact


@pytest.mark.parametrize("device", DEVICES)
def test_bad_mx_arguments_are_refused_with_what_is_allowed(device):
    x = torch.randn(4, 64, device=device)
    p, s, _ = ops.quantize(x, "mxfp8_e4m3", symmetric=True, group_size=32)
    with pytest.raises(ValueError, match="block of 32 values: group_size must be 32; got 16"):
        ops.quantize(x, "mxfp8_e4m3", symmetric=True, group_size=16)
    with pytest.raises(ValueError, match="block of 32 values"):
        ops.dequantize(p, s, None, "mxfp8_e4m3", symmetric=True, group_size=64, k=64)
    with pytest.raises(ValueError, match="symmetric by definition"):
        ops.quantize(x, "mxint8", symmetric=False, group_size=32)
    with pytest.raises(TypeError, match="E8M0 bytes"):
        ops.dequantize(p, s.float(), None, "mxfp8_e4m3", symmetric=True, group_size=32, k=64)
    with pytest.raises(TypeError, match="E8M0 bytes"):
        ops.quantize(x, "mxfp8_e4m3", symmetric=True, group_size=32, scale=torch.ones(4, 2, device=device))
    with pytest.raises(ValueError, match="scale must be finite"):  # a given scale that is E8M0's NaN
        ops.quantize(x, "mxfp8_e4m3", symmetric=True, group_size=32,
                     scale=torch.full((4, 2), 255, dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match="unknown format 'mxfp3'.*mxfp4_e2m1"):
        ops.quantize(x, "mxfp3", symmetric=True, group_size=32)
    with pytest.raises(ValueError, match="block-scaled format"):
        ops.encode_float(x, "mxfp4_e2m1")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_blocks_holding_nan_or_inf_get_the_nan_scale(fmt, device):
    """OCP MX: a block whose values include NaN (here also Inf, which no MX element format keeps
    through its block's scale) gets the NaN scale, E8M0 byte 0xFF, and every element of it decodes
    to NaN; the other blocks are as without those values (same bytes as the reference)."""
    x = data(3, 100, 7, 6)  # blocks [0, 32), [32, 64), [64, 96), [96, 100)
    x[0, 40] = float("nan")
    x[2, 97] = float("inf")
    x[1, 5] = -float("inf")
    packed, scale, _ = ops.quantize(x.to(device), fmt, symmetric=True, group_size=32)
    rp, rs, _ = reference.quantize(x, fmt, True, 32)
    assert torch.equal(scale.cpu(), rs) and torch.equal(packed.cpu(), rp)
    nan_blocks = {(0, 1), (2, 3), (1, 0)}
    assert {(r, g) for r in range(3) for g in range(4) if scale[r, g] == 255} == nan_blocks
    deq = ops.dequantize(packed, scale, None, fmt, symmetric=True, group_size=32, k=100).cpu()
    fake = ops.fake_quantize(x.to(device), fmt, symmetric=True, group_size=32).cpu()
    for r, g in nan_blocks:
        assert torch.isnan(deq[r, g * 32:(g + 1) * 32]).all() and torch.isnan(fake[r, g * 32:(g + 1) * 32]).all()
    clean = ~torch.isnan(deq)
    assert clean.sum() == 300 - 32 - 32 - 4 and torch.equal(fake[clean], deq[clean])
    assert torch.equal(deq[clean], reference.dequantize(rp, rs, None, fmt, True, 32, 100)[clean])
    y = ops.linear(torch.ones(2, 100, device=device), packed, scale, None, None, fmt, symmetric=True, group_size=32,
                   k=100).cpu()
    assert torch.isnan(y[:, [0, 1, 2]]).all()  # every row has a NaN block: NaN propagates, nothing raises
    with pytest.raises(ValueError, match="holds NaN or Inf"):
        from alphaquant.quantizers.registry import lookup
        q_cls, cfg = lookup({"mxfp4_e2m1": "mxfp4"}.get(fmt, fmt))
        q_cls(cfg()).quantize_weight(x)


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4_e2m1"])
def test_torchao_gives_nan_blocks_the_same_scale_byte(fmt):
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    elem = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp4_e2m1": torch.float4_e2m1fn_x2}[fmt]
    x = data(4, 64, 2, 4)
    x[1, 33] = float("nan")
    scale_e8m0, _ = mx.to_mx(x, elem, 32)
    _, scale, _ = ops.quantize(x, fmt, symmetric=True, group_size=32)
    assert torch.equal(scale, scale_e8m0.view(torch.uint8).reshape(4, 2)) and scale[1, 1] == 255
