"""quantization_error: (sum x^2, sum (x - dequantize)^2) in one pass, against the reference."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from alphaquant import ops, reference
from conftest import DEVICES

FORMATS = [("int4", False), ("int4", True), ("int2", False), ("int3", False), ("int6", True), ("int8", False),
           ("fp8_e4m3", True), ("fp8_e5m2", True), ("fp6_e3m2", True), ("fp4_e2m1", True), ("nf4", True)]


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 7), k=st.integers(1, 300), group=st.sampled_from([-1, 0, 7, 32, 64, 128]),
       fmt=st.sampled_from(FORMATS), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       byte_zero=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_quantization_error_matches_the_reference(rows, k, group, fmt, dtype, byte_zero, seed, device):
    name, symmetric = fmt
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g) * 3).to(dtype).to(device)
    packed, s, z = ops.quantize(x, name, symmetric=symmetric, group_size=group)
    if z.numel() == 0:
        z = None
    elif byte_zero:
        z = torch.randint(0, 256, tuple(z.shape), generator=g, dtype=torch.int64).to(torch.uint8).to(device)
    got = ops.quantization_error(x, packed, s, z, name, symmetric=symmetric, group_size=group)
    want = reference.quantization_error(x, packed, s, z, name, symmetric, group)
    assert got.dtype == torch.float64 and got.device.type == "cpu" and got.shape == (2,)
    # the same float32 differences, their squares summed in float32 lanes of at most 512 terms
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-30)


def test_strided_and_batched_inputs_and_a_known_error():
    x = torch.randn(3, 5, 64)
    packed, s, z = ops.quantize(x, "int4", symmetric=False, group_size=32)
    got = ops.quantization_error(x, packed, s, z, "int4", symmetric=False, group_size=32)
    deq = ops.dequantize(packed, s, z, "int4", symmetric=False, group_size=32, k=64)
    assert math.isclose(got[1].item(), float(((x - deq).double() ** 2).sum()), rel_tol=2e-5)
    assert math.isclose(got[0].item(), float((x.double() ** 2).sum()), rel_tol=2e-5)
    xt = torch.randn(64, 6).t()  # non-contiguous rows
    p, s2, _ = ops.quantize(xt, "fp8_e4m3", symmetric=True, group_size=0)
    torch.testing.assert_close(ops.quantization_error(xt, p, s2, None, "fp8_e4m3", symmetric=True, group_size=0),
                               reference.quantization_error(xt, p, s2, None, "fp8_e4m3", True, 0), rtol=2e-5, atol=1e-30)


def test_bad_arguments_are_refused_clearly():
    x = torch.randn(4, 32)
    packed, s, z = ops.quantize(x, "int4", symmetric=False, group_size=16)
    with pytest.raises(ValueError, match="does not hold the rows of x"):
        ops.quantization_error(x[:3], packed, s, z, "int4", symmetric=False, group_size=16)
    with pytest.raises(ValueError, match="packed rows hold"):
        ops.quantization_error(torch.randn(4, 40), packed, s, z, "int4", symmetric=False, group_size=16)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.quantization_error(x.int(), packed, s, z, "int4", symmetric=False, group_size=16)
    with pytest.raises(ValueError, match="needs zero_point"):
        ops.quantization_error(x, packed, s, None, "int4", symmetric=False, group_size=16)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        ops.quantization_error(x, packed, torch.zeros_like(s), z, "int4", symmetric=False, group_size=16)
    with pytest.raises(ValueError, match="non-empty"):
        ops.quantization_error(torch.randn(0, 32), packed[:0], s[:0], z[:0], "int4", symmetric=False, group_size=16)
