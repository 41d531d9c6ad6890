"""int8_act_unlayout: the CPU layout's codes back to the packed rows (csrc/cpu/int8_act_layout_cpu.cpp),
against the reference and as the exact inverse of int8_act_layout, on odd sizes and every code."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from alphaquant import ops, reference as ref
from alphaquant.formats import INT8_ACT_FORMATS, format_bits

E2M3 = ("fp6_e2m3", "mxfp6_e2m3")
NEG_ZERO_E2M3 = 0b100000


def _packed_with_every_code(fmt, n, k, seed=0):
    """(packed, scale, zero, codes) of a weight [n, k] in ``fmt`` whose codes are drawn at random
    from all of the format's codes (the scales from quantizing a random weight)."""
    g = torch.Generator().manual_seed(seed)
    symmetric = not fmt.startswith("int")
    group_size = 16 if fmt == "nvfp4" else 32
    _, scale, zero = ops.quantize(torch.randn(n, k, generator=g), fmt, symmetric=symmetric, group_size=group_size)
    if symmetric and fmt != "nvfp4":
        zero = None
    bits = format_bits(fmt)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    return ref.pack(codes, bits), scale, zero, codes, symmetric, group_size


def _round_trip(fmt, n, k, seed=0):
    packed, scale, zero, codes, symmetric, group_size = _packed_with_every_code(fmt, n, k, seed)
    layout, _ = ops.int8_act_layout(packed, scale, zero, fmt, symmetric=symmetric, group_size=group_size, k=k)
    back = ops.int8_act_unlayout(layout, fmt, n=n, k=k)
    assert back.dtype == torch.uint8 and back.shape == packed.shape
    assert torch.equal(back, ref.int8_act_unlayout(layout, fmt, n, k))
    if fmt in E2M3:  # -0 and +0 share a grid value: -0 comes back as +0, every other code as itself
        want = ref.pack(torch.where(codes == NEG_ZERO_E2M3, 0, codes), format_bits(fmt))
        assert bool((codes == NEG_ZERO_E2M3).any()) or codes.numel() < 1000  # drawn among 64 codes
    else:
        want = packed
    assert torch.equal(back, want)


@pytest.mark.parametrize("fmt", INT8_ACT_FORMATS)
@pytest.mark.parametrize("n,k", [(16, 32), (37, 100), (5, 70), (33, 256)])
def test_round_trip_every_format(fmt, n, k):
    _round_trip(fmt, n, k)


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(INT8_ACT_FORMATS), n=st.integers(1, 40), kb=st.integers(1, 5), rem=st.integers(0, 31),
       seed=st.integers(0, 2**16))
def test_round_trip_random_shapes(fmt, n, kb, rem, seed):
    k = 32 * kb - rem if fmt != "nvfp4" else 16 * (2 * kb) - (rem // 16) * 16
    _round_trip(fmt, n, max(k, 1), seed)


def test_bad_input():
    packed, scale, _, _, _, _ = _packed_with_every_code("int4", 16, 64)
    layout, _ = ops.int8_act_layout(packed, scale, None, "int4", symmetric=True, group_size=32, k=64)
    with pytest.raises(ValueError, match="codes must be uint8"):
        ops.int8_act_unlayout(layout, "int8", n=16, k=64)  # another width's layout
    with pytest.raises(ValueError, match="codes must be uint8"):
        ops.int8_act_unlayout(layout, "int4", n=40, k=64)
    with pytest.raises(ValueError, match="codes must be uint8"):
        ops.int8_act_unlayout(layout.view(torch.int8), "int4", n=16, k=64)
    with pytest.raises(ValueError, match="n and k must be > 0"):
        ops.int8_act_unlayout(layout, "int4", n=0, k=64)
    with pytest.raises(ValueError, match="format"):
        ops.int8_act_unlayout(layout, "fp8_e4m3", n=16, k=64)
