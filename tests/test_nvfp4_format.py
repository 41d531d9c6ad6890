"""NVFP4: fp4_e2m1 values, an E4M3 scale byte per 16 values and a float32 global scale per tensor
(compressed-tensors' recipe), against the reference, ml_dtypes' element type, compressed-tensors'
own quantizer and torchao's NVFP4 reference."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from alphaquant import ops, reference
from conftest import DEVICES

ml_dtypes = pytest.importorskip("ml_dtypes")


def data(rows, k, seed, spread):
    """Blocks whose maxima span many binades (spread), zeros and tiny blocks mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.exp2(torch.randint(-spread, spread + 1, (rows, -(-k // 16)),
                                                                     generator=g).float()).repeat_interleave(16, -1)[:, :k]
    x[torch.rand(rows, k, generator=g) < 0.05] = 0.0
    return x


def nvfp4(x, **kw):
    return ops.quantize(x, "nvfp4", symmetric=True, group_size=16, **kw)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), k=st.integers(1, 200), dtype=st.sampled_from([torch.float32, torch.bfloat16,
                                                                              torch.float16]),
       spread=st.integers(0, 10), stochastic=st.booleans(), seed=st.integers(0, 2**31 - 1),
       given_global=st.booleans())
def test_kernels_match_the_reference_bit_for_bit(rows, k, dtype, spread, stochastic, seed, given_global, device):
    x = data(rows, k, seed, spread if dtype != torch.float16 else min(spread, 4)).to(dtype)
    g = torch.tensor([float(seed % 1000) / 7.0 + 0.5]) if given_global else None
    packed, scale, gs = nvfp4(x.to(device), zero_point=None if g is None else g.to(device), stochastic=stochastic,
                              seed=seed)
    rp, rs, rg = reference.quantize(x, "nvfp4", True, 16, zero_point=g, stochastic=stochastic, seed=seed)
    assert scale.dtype == torch.uint8 and scale.shape == (rows, -(-k // 16)) and gs.shape == (1,)
    assert torch.equal(gs.cpu(), rg) and torch.equal(scale.cpu(), rs) and torch.equal(packed.cpu(), rp)
    deq = ops.dequantize(packed, scale, gs, "nvfp4", symmetric=True, group_size=16, k=k)
    assert torch.equal(deq.cpu(), reference.dequantize(rp, rs, rg, "nvfp4", True, 16, k))
    fake = ops.fake_quantize(x.to(device), "nvfp4", symmetric=True, group_size=16, stochastic=stochastic, seed=seed,
                             zero_point=None if g is None else g.to(device))
    assert torch.equal(fake.cpu(), reference.fake_quantize(x, "nvfp4", True, 16, zero_point=g, stochastic=stochastic,
                                                           seed=seed))
    again = nvfp4(x.to(device), scale=scale, zero_point=gs)  # static: the same bits
    assert stochastic or (torch.equal(again[0], packed) and torch.equal(again[1], scale))
    w = torch.randn(3 if seed % 2 else 20, k, generator=torch.Generator().manual_seed(seed)).to(device)
    want = reference.linear(w, rp, rs, rg, None, "nvfp4", True, 16, k)
    bound = (w.abs().cpu() @ reference.dequantize(rp, rs, rg, "nvfp4", True, 16, k).abs().t()).max()
    torch.testing.assert_close(ops.linear(w, packed, scale, gs, None, "nvfp4", symmetric=True, group_size=16, k=k).cpu(),
                               want, rtol=0, atol=float(1e-5 * bound) + 1e-30)  # float32 sums in another order
    err = ops.quantization_error(x.to(device), packed, scale, gs, "nvfp4", group_size=16)
    torch.testing.assert_close(err, reference.quantization_error(x, rp, rs, rg, "nvfp4", True, 16), rtol=1e-5, atol=0)


def test_scales_and_elements_are_e4m3_and_ml_dtypes_casts():
    """Global scale 2688 / max|x|; scale byte = E4M3 of (block max / 6) * g; element = ml_dtypes'
    round-to-nearest-even float4_e2m1fn cast of x / (scale / g), saturated at 6 (numpy float32)."""
    x = data(7, 96, 3, 6)
    packed, scale, g = nvfp4(x)
    xn = x.numpy()
    g_want = np.float32(2688.0) / np.abs(xn).max()
    assert g.numpy()[0] == g_want
    amax = np.abs(xn.reshape(7, 6, 16)).max(-1)
    s = np.minimum((amax / np.float32(6)) * g_want, np.float32(448)).astype(ml_dtypes.float8_e4m3fn)
    s = np.where(s.astype(np.float32) == 0, ml_dtypes.float8_e4m3fn(0.125), s)
    assert np.array_equal(scale.numpy(), s.view(np.uint8))
    S = (s.astype(np.float32) / g_want).astype(np.float32)
    scaled = np.clip(xn.reshape(7, 6, 16) / S[..., None], -6, 6)
    want = (scaled.astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * S[..., None]).reshape(7, 96)
    assert np.array_equal(ops.dequantize(packed, scale, g, "nvfp4", group_size=16, k=96).numpy(), want)


def test_compressed_tensors_quantizer_gives_the_same_bits():
    """compressed-tensors' own NVFP4 path (generate_gparam, calculate_qparams, its fp4 packer and
    fake_quantize) on float32 weights: the same global scale, scale bytes, packed bytes and values."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                            dynamic=False, scale_dtype=torch.float8_e4m3fn)
    for seed, spread in ((0, 0), (1, 4), (2, 10)):
        x = data(33, 160, seed, spread)
        gs = generate_gparam(x.min(), x.max())
        blocks = x.reshape(33, 10, 16)
        sc, zp = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=gs)
        packed, scale, g = nvfp4(x)
        assert torch.equal(g, gs) and torch.equal(scale, sc.to(torch.float8_e4m3fn).view(torch.uint8))
        codes = quantize(x, sc, zp, args, global_scale=gs)
        assert torch.equal(packed, pack_fp4_to_uint8(codes))
        assert torch.equal(ops.dequantize(packed, scale, g, "nvfp4", group_size=16, k=160),
                           fake_quantize(x, sc, zp, args, global_scale=gs))


def test_torchao_nvfp4_decodes_our_bytes_to_our_values():
    """torchao stores the same three parts (E2M1 nibbles, E4M3 bytes, a float32 tensor scale) but
    multiplies by its per-tensor scale where compressed-tensors divides by the global scale (see
    RESULTS.md): given our bytes and 1/g as its scale where 1/g is exact, it decodes our values; its
    own quantizer is checked to agree on nearly every element."""
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    x = data(16, 128, 5, 4)
    packed, scale, _ = nvfp4(x, zero_point=torch.tensor([64.0]))  # 1/64 is exact
    theirs = nv.NVFP4Tensor(packed, scale.view(torch.float8_e4m3fn), 16, torch.float32,
                            per_tensor_scale=torch.tensor(1 / 64.0)).dequantize(torch.float32)
    assert torch.equal(theirs, ops.dequantize(packed, scale, torch.tensor([64.0]), "nvfp4", group_size=16, k=128))
    g = reference.nvfp4_global_scale(x)
    t_scale, t_packed = nv.nvfp4_quantize(x, 16, per_tensor_scale=1.0 / g)
    packed, scale, _ = nvfp4(x)
    assert (t_scale.view(torch.uint8) == scale).float().mean() > 0.97
    assert (t_packed == packed).float().mean() > 0.97


def test_all_zero_and_tiny_blocks_and_saturation():
    x = torch.zeros(2, 40)
    x[1, 20] = 3.0  # one block with a value, the others all zero
    p, s, g = nvfp4(x)
    assert g.item() == 2688.0 / 3.0 and (s[0] == 0x20).all() and s[1, 1] == 0x7E  # 0.125 (zero blocks), 448
    d = ops.dequantize(p, s, g, "nvfp4", group_size=16, k=40)
    assert torch.equal(d, x)
    zeros = torch.zeros(3, 16)
    p, s, g = nvfp4(zeros)
    assert g.item() == 1.0  # 2688 / (smallest normal) overflows float32: compressed-tensors falls back to 1
    assert (ops.dequantize(p, s, g, "nvfp4", group_size=16, k=16) == 0).all()
    big = torch.tensor([[1e30] * 16])  # 2688 / 1e30: a small but normal global scale
    p, s, g = nvfp4(big)
    assert torch.allclose(ops.dequantize(p, s, g, "nvfp4", group_size=16, k=16), big, rtol=1e-6)
    # a given global scale too small for a block: its scale saturates at 448 and its values at 6
    p, s, g = nvfp4(torch.full((1, 16), 1e5), zero_point=torch.tensor([1.0]))
    assert s[0, 0] == 0x7E and (ops.dequantize(p, s, g, "nvfp4", group_size=16, k=16) == 448.0 * 6).all()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_nvfp4_arguments_are_refused_with_what_is_allowed(device):
    x = torch.randn(4, 64, device=device)
    p, s, g = nvfp4(x)
    with pytest.raises(ValueError, match="block of 16 values: group_size must be 16; got 32"):
        ops.quantize(x, "nvfp4", symmetric=True, group_size=32)
    with pytest.raises(ValueError, match="block of 16 values"):
        ops.dequantize(p, s, g, "nvfp4", symmetric=True, group_size=64, k=64)
    with pytest.raises(ValueError, match="symmetric by definition"):
        ops.quantize(x, "nvfp4", symmetric=False, group_size=16)
    with pytest.raises(TypeError, match="E4M3 bytes"):
        ops.dequantize(p, s.float(), g, "nvfp4", symmetric=True, group_size=16, k=64)
    with pytest.raises(ValueError, match="needs its float32 global scale"):
        ops.dequantize(p, s, None, "nvfp4", symmetric=True, group_size=16, k=64)
    with pytest.raises(ValueError, match=r"global scale \(zero_point\) must have shape \[1\]"):
        ops.linear(torch.randn(2, 64, device=device), p, s, g.expand(4), None, "nvfp4", symmetric=True, group_size=16,
                   k=64)
    for byte in (0x7F, 0x00, 0xA0):  # E4M3 NaN, zero, a negative scale
        bad_scale = s.clone()
        bad_scale[0, 0] = byte
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            ops.dequantize(p, bad_scale, g, "nvfp4", symmetric=True, group_size=16, k=64)
        for m in (1, 20):  # the CPU reads scale bytes in its gemv (m <= 16) and decodes them for GEMM tiles
            with pytest.raises(ValueError, match="scale must be finite and > 0"):
                ops.linear(torch.randn(m, 64, device=device), p, bad_scale, g, None, "nvfp4", group_size=16, k=64)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        ops.dequantize(p, s, torch.tensor([0.0], device=device), "nvfp4", symmetric=True, group_size=16, k=64)
    # rows of 20 groups: the CPU gemv checks eight groups' scales as one vector, then a tail
    wide = torch.randn(3, 320, device=device)
    for fmt in ("nvfp4", "fp4_e2m1"):
        pw, sw, gw = ops.quantize(wide, fmt, group_size=16)
        gw = gw if fmt == "nvfp4" else None
        for col in (5, 17):  # in a vector of eight, in the tail
            bad_w = sw.clone()
            bad_w[1, col] = 0x7F if fmt == "nvfp4" else float("nan")
            with pytest.raises(ValueError, match="scale must be finite and > 0"):
                ops.linear(torch.randn(2, 320, device=device), pw, bad_w, gw, None, fmt, group_size=16, k=320)
    bad = x.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf, which nvfp4 cannot represent"):
        nvfp4(bad)
    with pytest.raises(ValueError, match="NaN or Inf, which nvfp4 cannot represent"):
        nvfp4(bad, zero_point=g)
    with pytest.raises(ValueError, match="block-scaled format.*fp4_e2m1"):
        ops.encode_float(x, "nvfp4")
    as_float8 = ops.embedding(torch.tensor([2, 0], device=device), p, s.view(torch.float8_e4m3fn), g, "nvfp4",
                              group_size=16, k=64)  # scales may also come as torch's float8_e4m3fn
    assert torch.equal(as_float8, ops.dequantize(p, s, g, "nvfp4", group_size=16, k=64)[[2, 0]])
    meta = torch.empty(4, 64, device="meta")
    pm, sm, gm = ops.quantize(meta, "nvfp4", symmetric=True, group_size=16)
    assert sm.dtype == torch.uint8 and sm.shape == (4, 4) and gm.shape == (1,)
