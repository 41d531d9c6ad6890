"""The int8-activation path of the CPU linear op (csrc/cpu/int8_act_layout.h): int8_act_layout and
linear_int8_act against the reference (dequantized weight times int8-quantized activations), on
every instruction set this CPU has (ALPHAQUANT_CPU_ISA), odd sizes, every integer width."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from alphaquant import ops, reference as ref
from alphaquant.formats import INT8_ACT_FORMATS, format_bits, format_max

ISAS = ["portable", "avx2", "avx512_vnni"]


def _weight(n, k, fmt, symmetric, group_size, byte_zero=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, scale, zero = ops.quantize(w, fmt, symmetric=symmetric, group_size=group_size)
    if symmetric and fmt != "nvfp4":  # nvfp4's third tensor is its global scale
        zero = None
    elif byte_zero:
        zero = torch.randint(0, 256, tuple(zero.shape), dtype=torch.uint8, generator=g)
    return packed, scale, zero


def _step(scale, fmt, group_size, n, k, zero=None):
    """Per element, the largest magnitude a term of the kernel's sums reaches for one activation unit."""
    if fmt == "nvfp4":
        s, fmt = ref.nvfp4_scale_values(scale, zero), "fp4_e2m1"
    elif fmt.startswith("mx"):
        s, group_size = ref.mx_scale_values(scale, fmt), 32
    else:
        s = scale.float()
    reach = 2.0 ** (format_bits(fmt) + 1) if fmt.startswith(("int", "mxint")) else 2 * format_max(fmt.removeprefix("mx"))
    return ref._expand(s, (n, k), group_size).double() * reach


def _check(x, packed, scale, zero, bias, fmt, symmetric, group_size, n, k):
    codes, params = ops.int8_act_layout(packed, scale, zero, fmt, symmetric=symmetric, group_size=group_size, k=k)
    y = ops.linear_int8_act(x, codes, params, bias, fmt=fmt, group_size=group_size, n=n, k=k)
    assert y.shape == x.shape[:-1] + (n,) and y.dtype == x.dtype
    want = ref.linear_int8_act(x, packed, scale, zero, bias, fmt, symmetric, group_size, k)
    # float32 sums in the kernel: bound the error by the size of what it sums, the codes' grid
    # values and the offsets apart (each up to about 2^bits steps, or twice a float grid's max)
    w = ref.dequantize(packed, scale, zero, fmt, symmetric, group_size, k).double()
    size = ref.quantize_activations_int8(x).double().abs() @ (w.abs() + _step(scale, fmt, group_size, n, k, zero)).T
    tol = 2e-5 * size + 1e-6
    if x.dtype != torch.float32:  # the result is rounded to x's dtype
        tol = tol + want.abs() * (2.0 ** -7 if x.dtype == torch.bfloat16 else 2.0 ** -10)
    err = (y.double() - want).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g} (tolerance {tol.min().item():.3g}..)"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,symmetric,group_size,n,k", [
    ("int4", True, 128, 64, 256),
    ("int4", False, 32, 37, 100),      # odd n, k not a multiple of 32 (short last block and group)
    ("int8", True, 0, 50, 64),         # per channel
    ("int8", False, 64, 17, 200),
    ("int2", False, 64, 33, 128),
    ("int1", False, 32, 16, 32),
    ("int3", True, -1, 20, 96),        # per tensor
    ("int5", False, 96, 19, 190),
    ("int6", False, 32, 17, 65),
    ("int7", True, 32, 31, 33),
    ("fp4_e2m1", True, 32, 37, 100),   # float grids: 4-bit codes through the kernels' table
    ("fp4_e2m1", True, 0, 16, 64),
    ("mxfp4_e2m1", True, 32, 18, 96),
    ("fp6_e2m3", True, 64, 17, 130),   # byte fields hold the grid values
    ("mxfp6_e2m3", True, 32, 33, 64),
    ("mxint8", True, 32, 20, 70),
    ("nvfp4", True, 16, 37, 100),      # 16-value groups, two per activation block; k % 32 = 4: a last
    ("int4", False, 16, 17, 48),       # group of 4 values, and a block holding one group
    ("int8", True, 16, 16, 96),
    ("int2", True, 16, 20, 64),
])
def test_matches_reference(isa, fmt, symmetric, group_size, n, k, monkeypatch):
    monkeypatch.setenv("ALPHAQUANT_CPU_ISA", isa)
    packed, scale, zero = _weight(n, k, fmt, symmetric, group_size)
    for m in (1, 3, 8, 13):  # rows of x: single, a partial pass, one full pass, more
        x = torch.randn(m, k)
        _check(x, packed, scale, zero, torch.randn(n), fmt, symmetric, group_size, n, k)
    _check(torch.randn(2, 5, k), packed, scale, zero, None, fmt, symmetric, group_size, n, k)
    if scale.dtype == torch.float32:  # float16 scales: kept float16 in the layout without zero points
        _check(torch.randn(3, k), packed, scale.half(), zero, None, fmt, symmetric, group_size, n, k)


@pytest.mark.parametrize("isa", ISAS)
def test_dtypes_byte_zero_points_noncontiguous(isa, monkeypatch):
    monkeypatch.setenv("ALPHAQUANT_CPU_ISA", isa)
    n, k = 40, 160
    packed, scale, zero = _weight(n, k, "int4", False, 32, byte_zero=True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(k, 6).to(dtype).T  # non-contiguous
        _check(x, packed, scale.half(), zero, torch.randn(n).to(dtype), "int4", False, 32, n, k)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 70), k=st.integers(1, 300), m=st.integers(1, 20), fmt=st.sampled_from(INT8_ACT_FORMATS),
       symmetric=st.booleans(), group=st.sampled_from([32, 64, 16, 0, -1]), isa=st.sampled_from(ISAS),
       seed=st.integers(0, 2 ** 16))
def test_random_shapes(n, k, m, fmt, symmetric, group, isa, seed):
    import os
    if not fmt.startswith("int"):
        symmetric = True  # float and MX formats have no zero point
    symmetric = symmetric and fmt != "int1"  # int1 has no symmetric form
    if fmt.startswith("mx"):
        group = 32  # one scale per block of 32
    if fmt == "nvfp4":
        group = 16  # one scale per block of 16
    packed, scale, zero = _weight(n, k, fmt, symmetric, group, seed=seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)) * 3
    old = os.environ.get("ALPHAQUANT_CPU_ISA")
    os.environ["ALPHAQUANT_CPU_ISA"] = isa
    try:
        _check(x, packed, scale, zero, None, fmt, symmetric, group, n, k)
    finally:
        if old is None:
            del os.environ["ALPHAQUANT_CPU_ISA"]
        else:
            os.environ["ALPHAQUANT_CPU_ISA"] = old


def test_isas_agree_closely(monkeypatch):
    # the SIMD kernels sum in another order than the portable one: float32 rounding apart
    n, k = 96, 1024
    packed, scale, _ = _weight(n, k, "int4", True, 128)
    codes, params = ops.int8_act_layout(packed, scale, None, "int4", symmetric=True, group_size=128, k=k)
    x = torch.randn(9, k)
    ys = {}
    for isa in ISAS:
        monkeypatch.setenv("ALPHAQUANT_CPU_ISA", isa)
        ys[ops.cpu_isa()] = ops.linear_int8_act(x, codes, params, None, fmt="int4", group_size=128, n=n, k=k)
    for y in ys.values():
        torch.testing.assert_close(y, ys["portable"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_codes_round_ties_to_even(isa, dtype, monkeypatch):
    """Activations on rounding ties (block max 127: scale 1, values j + 0.5): every code shows in y
    through a one-hot int8 weight, so a code one step off (e.g. a tie rounded up) is an error of
    one scale step, far above the tolerance. Full blocks take the vector quantizer on x86."""
    monkeypatch.setenv("ALPHAQUANT_CPU_ISA", isa)
    k, n = 96, 96
    ties = torch.arange(-127, 127, dtype=torch.float32) + 0.5
    x = torch.stack([torch.cat([torch.tensor([127.0]), ties[i::3][:k // 3 - 1]] * 3) for i in range(3)])
    x = x.to(dtype)
    w = torch.eye(n, k) * 0.5
    packed, scale, _ = ops.quantize(w, "int8", symmetric=True, group_size=0)
    codes, params = ops.int8_act_layout(packed, scale, None, "int8", symmetric=True, group_size=0, k=k)
    y = ops.linear_int8_act(x, codes, params, None, fmt="int8", group_size=0, n=n, k=k).double()
    want = ref.linear_int8_act(x, packed, scale, None, None, "int8", True, 0, k)
    assert torch.equal(ref.quantize_activations_int8(x), torch.round(x.float()))  # ties to even, scale 1
    torch.testing.assert_close(y, want, rtol=0, atol=0.05)  # a code one step off: 0.5


def test_layout_is_the_documented_permutation():
    # int8_act_layout.h: byte 4*row + i of word p, field s holds code (row, 32*block + 4*(P*p + s) + i)
    n, k = 20, 70
    for bits, sbits in ((2, 2), (4, 4), (6, 8)):
        packed, scale, _ = _weight(n, k, f"int{bits}", True, 0)
        codes, params = ops.int8_act_layout(packed, scale, None, f"int{bits}", symmetric=True, group_size=0, k=k)
        c = ops.unpack(packed, bits, k)
        fields = 8 / sbits
        for (row, col) in ((0, 0), (3, 5), (15, 69), (16, 33), (19, 64)):
            t, lane, b, j = row // 16, row % 16, col // 32, col % 32
            quad, i = divmod(j, 4)
            p, s = divmod(quad, int(fields))
            byte = codes[t, b, p * 64 + 4 * lane + i].item()
            assert (byte >> (sbits * s)) & ((1 << sbits) - 1) == c[row, col].item()
        assert codes[1, :, :].reshape(-1, 64)[:, 4 * 4:].sum() == 0  # rows 20..31 of tile 1: padding
        torch.testing.assert_close(params[0, 0, 0], scale[:16, 0])  # symmetric: one param (o = s * qmin)
        assert params.shape[2] == 1 and params.dtype == torch.float32
    packed, scale, zero = _weight(n, k, "int4", False, 32)
    _, params = ops.int8_act_layout(packed, scale, zero, "int4", symmetric=False, group_size=32, k=k)
    assert params.shape == (2, 3, 2, 16)
    torch.testing.assert_close(params[0, 1, 1], scale[:16, 1] * (0 - zero[:16, 1]))  # o = s * (qmin - z)
    packed, scale, _ = _weight(n, k, "int4", True, 32)
    _, params = ops.int8_act_layout(packed, scale.half(), None, "int4", symmetric=True, group_size=32, k=k)
    assert params.dtype == torch.float16 and torch.equal(params[0, 2, 0], scale[:16, 2].half())


def test_empty_batch():
    packed, scale, _ = _weight(16, 64, "int4", True, 32)
    codes, params = ops.int8_act_layout(packed, scale, None, "int4", symmetric=True, group_size=32, k=64)
    y = ops.linear_int8_act(torch.randn(0, 64), codes, params, None, fmt="int4", group_size=32, n=16, k=64)
    assert y.shape == (0, 16)


def test_bad_input():
    n, k = 16, 64
    packed, scale, _ = _weight(n, k, "int4", True, 32)
    codes, params = ops.int8_act_layout(packed, scale, None, "int4", symmetric=True, group_size=32, k=k)
    x = torch.randn(2, k)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.linear_int8_act(torch.full((1, k), float("nan")), codes, params, None, fmt="int4", group_size=32, n=n, k=k)
    with pytest.raises(ValueError, match="codes must be uint8"):
        ops.linear_int8_act(x, codes[:, :1], params, None, fmt="int4", group_size=32, n=n, k=k)
    with pytest.raises(ValueError, match="codes must be uint8"):
        ops.linear_int8_act(x, codes, params, None, fmt="int8", group_size=32, n=n, k=k)  # another width's layout
    with pytest.raises(ValueError, match="params must be float32 or float16"):
        ops.linear_int8_act(x, codes, params.double(), None, fmt="int4", group_size=32, n=n, k=k)
    with pytest.raises(ValueError, match="params must be float32 or float16"):
        ops.linear_int8_act(x, codes, params.expand(-1, -1, 2, -1).half(), None, fmt="int4", group_size=32, n=n, k=k)
    with pytest.raises(ValueError, match=r"x must be \[..., k=64\]"):
        ops.linear_int8_act(torch.randn(2, 63), codes, params, None, fmt="int4", group_size=32, n=n, k=k)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.linear_int8_act(x.int(), codes, params, None, fmt="int4", group_size=32, n=n, k=k)
    with pytest.raises(ValueError, match="bias must be"):
        ops.linear_int8_act(x, codes, params, torch.zeros(3), fmt="int4", group_size=32, n=n, k=k)
    p8, s8, _ = ops.quantize(torch.randn(n, k), "fp8_e4m3", symmetric=True, group_size=32)
    with pytest.raises(ValueError, match="integer grid"):
        ops.int8_act_layout(p8, s8, None, "fp8_e4m3", symmetric=True, group_size=32, k=k)
    with pytest.raises(ValueError, match="fmt must be a format int8_act_layout takes"):
        ops.linear_int8_act(x, codes, params, None, fmt="nf4", group_size=32, n=n, k=k)
    with pytest.raises(ValueError, match="format"):
        ops.linear_int8_act(x, codes, params, None, fmt="int9", group_size=32, n=n, k=k)
    p8g, s8g, _ = ops.quantize(torch.randn(n, k), "int4", symmetric=True, group_size=8)
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.int8_act_layout(p8g, s8g, None, "int4", symmetric=True, group_size=8, k=k)
    with pytest.raises(ValueError, match="scale"):
        ops.int8_act_layout(packed, scale * float("nan"), None, "int4", symmetric=True, group_size=32, k=k)
    with pytest.raises(ValueError, match="weight"):
        ops.int8_act_layout(packed.reshape(2, 8, -1), scale.reshape(2, 8, -1), None, "int4", symmetric=True,
                            group_size=32, k=k)



def test_large_batch_then_small():
    # a batch past the 16 MiB of kept scratch, then a small one: the scratch is given back and regrown
    n, k = 16, 4096
    packed, scale, _ = _weight(n, k, "int4", True, 128)
    x = torch.randn(4200, k)
    _check(x, packed, scale, None, None, "int4", True, 128, n, k)
    _check(x[:3], packed, scale, None, None, "int4", True, 128, n, k)
