"""The CPU linear op's bf16-activation path (AVX-512 BF16 dot products, csrc/cpu/linear_bf16_avx512.cpp):
for up to 16 rows of bf16 x it multiplies the bf16 values of the codes (exact) and sums in float32,
so its result is the exact product x @ dequantize(W).T up to float32 summation and the bf16 output
rounding. Checked against that product in float64, on every format it takes, group kind, odd row
counts and against the float32 path it replaces (ALPHAQUANT_CPU_ISA=avx2)."""
import pytest
import torch

from alphaquant import ops

pytestmark = pytest.mark.skipif(not ops.cpu_bf16_dot(), reason="the CPU has no AVX-512 BF16 (or it is turned off)")

# (format, symmetric, group size): every decoder of the kernel (table of 1/2/4/6-bit codes, NF4's
# three-part values, 8-bit integers, FP8 through F16C) and every group kind (per group, 16-value
# groups two per chunk, per channel, per tensor)
CASES = [
    ("int4", True, 32), ("int4", False, 128), ("int4", True, 0), ("int4", True, -1), ("int4", True, 16),
    ("int2", False, 64), ("int1", False, 32), ("int6", True, 128), ("int6", False, 64), ("int8", True, 32),
    ("int8", False, 0), ("fp4_e2m1", True, 32), ("nf4", True, 64), ("fp6_e3m2", True, 32), ("fp6_e2m3", True, 64),
    ("fp8_e4m3", True, 0), ("fp8_e5m2", True, 128), ("mxfp4_e2m1", True, 32), ("mxfp6_e3m2", True, 32),
    ("mxfp6_e2m3", True, 32), ("mxfp8_e4m3", True, 32), ("mxfp8_e5m2", True, 32), ("mxint8", True, 32),
    ("nvfp4", True, 16),
]


def _weight(fmt, symmetric, group_size, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, s, z = ops.quantize(w, fmt, symmetric=symmetric, group_size=group_size)
    return packed, s, z


def _exact(x, packed, s, z, bias, fmt, symmetric, group_size, k):
    w = ops.dequantize(packed, s, z, fmt, symmetric=symmetric, group_size=group_size, k=k)
    y = x.double() @ w.double().T + bias.double()
    bound = x.double().abs() @ w.double().abs().T  # float32 summation error is a fraction of this
    return y, bound


@pytest.mark.parametrize("fmt,symmetric,group_size", CASES)
@pytest.mark.parametrize("m", [1, 5, 16])
def test_bf16_dot_is_the_exact_product_rounded(fmt, symmetric, group_size, m):
    n, k = 37, 256
    packed, s, z = _weight(fmt, symmetric, group_size, n, k)
    x = torch.randn(m, k).to(torch.bfloat16)
    bias = torch.randn(n)
    y = ops.linear(x, packed, s, z, bias, fmt, symmetric=symmetric, group_size=group_size, k=k)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    want, bound = _exact(x, packed, s, z, bias, fmt, symmetric, group_size, k)
    err = (y.double() - want).abs()
    # bf16 output: half an ulp (2^-9 relative); float32 sums of 256 terms: well under 1e-5 of the bound
    assert (err <= want.abs() * 2.0 ** -8 + 1e-5 * bound + 1e-30).all(), (err - want.abs() * 2.0 ** -8).max()


@pytest.mark.parametrize("fmt,symmetric,group_size", CASES)
def test_bf16_dot_agrees_with_the_float32_path(fmt, symmetric, group_size, monkeypatch):
    n, k = 19, 512
    packed, s, z = _weight(fmt, symmetric, group_size, n, k, seed=3)
    x = torch.randn(3, 2, k).to(torch.bfloat16)[:, 1]  # non-contiguous rows
    y = ops.linear(x, packed, s, z, None, fmt, symmetric=symmetric, group_size=group_size, k=k)
    monkeypatch.setenv("ALPHAQUANT_CPU_ISA", "avx2")
    assert not ops.cpu_bf16_dot()
    y_float = ops.linear(x, packed, s, z, None, fmt, symmetric=symmetric, group_size=group_size, k=k)
    # both round the same float32-exact products to bf16: at most one bf16 step apart
    assert torch.allclose(y.float(), y_float.float(), rtol=2.0 ** -7, atol=1e-6)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "nf4", "int8", "int6", "int4",
                                 "int2", "int1"])
def test_bf16_dot_every_code(fmt, monkeypatch):
    # one weight row holds every code in turn (subnormals, signs; NaN and Inf codes in FP8), each
    # other row one code: the decoders in registers against the float path's table
    bits = {"fp8_e4m3": 8, "fp8_e5m2": 8, "int8": 8, "fp6_e3m2": 6, "fp6_e2m3": 6, "int6": 6, "int2": 2,
            "int1": 1}.get(fmt, 4)
    k = 256
    codes = torch.arange(k, dtype=torch.int64) % (2 ** bits)
    rows = torch.stack([codes] + [torch.full((k,), c) for c in range(0, 2 ** bits, max(1, 2 ** bits // 16))])
    packed = ops.pack(rows.to(torch.uint8), bits)
    s = torch.rand(rows.shape[0], 1) + 0.5
    x = torch.eye(k)[:40].to(torch.bfloat16)  # each output is one decoded value times its scale
    z, symmetric = (torch.zeros_like(s), False) if fmt == "int1" else (None, True)  # int1 has no symmetric form
    y = ops.linear(x, packed, s, z, None, fmt, symmetric=symmetric, group_size=0, k=k)
    monkeypatch.setenv("ALPHAQUANT_CPU_ISA", "avx2")
    y_float = ops.linear(x, packed, s, z, None, fmt, symmetric=symmetric, group_size=0, k=k)
    torch.testing.assert_close(y, y_float, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("fmt,symmetric,group_size", CASES)
@pytest.mark.parametrize("dtype,m", [(torch.float32, 1), (torch.float16, 1), (torch.float32, 3), (torch.float16, 4)])
def test_split_activations_give_the_exact_product(fmt, symmetric, group_size, dtype, m):
    # float32 / float16 rows split into 3 / 2 bf16 parts that sum to them exactly (one row; up to 9
    # bf16 rows for 6- and 8-bit codes): products stay exact, only the float32 sums round
    n, k = 29, 256
    packed, s, z = _weight(fmt, symmetric, group_size, n, k, seed=5)
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 3, k)).to(dtype)  # values that need every part
    bias = torch.randn(n)
    y = ops.linear(x, packed, s, z, bias, fmt, symmetric=symmetric, group_size=group_size, k=k)
    assert y.dtype == dtype
    want, bound = _exact(x, packed, s, z, bias, fmt, symmetric, group_size, k)
    out_rounding = 2.0 ** -11 if dtype == torch.float16 else 0.0
    err = (y.double() - want).abs()
    # float32 sums: measured below 4e-7 of the bound; a part too few (16 bits of 24) gives ~1e-5
    assert (err <= want.abs() * out_rounding + 1e-6 * bound + 1e-30).all(), (err / bound).max()


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "int4"])
def test_split_activations_keep_inf_and_nan(fmt):
    n, k = 8, 64
    packed, s, z = _weight(fmt, True, 32, n, k)
    x = torch.randn(1, k)
    x[0, 3] = float("inf")
    y = ops.linear(x, packed, s, None, None, fmt, group_size=32, k=k)
    w = ops.dequantize(packed, s, None, fmt, group_size=32, k=k)
    want = x.double() @ w.double().T  # inf times a value of 0 is NaN, else +-inf
    if fmt == "int4":
        # integers sum code * x and x apart (offset term), as the float32 path does: inf - inf
        # gives NaN where the product is +-inf; non-finite either way
        assert not y.isfinite().any()
    else:
        torch.testing.assert_close(y.double(), want, equal_nan=True)
    x[0, 3] = float("nan")
    assert ops.linear(x, packed, s, None, None, fmt, group_size=32, k=k).isnan().all()
