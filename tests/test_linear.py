"""The fused low-bit linear op against dequantize-then-F.linear in float32."""
import pytest
import torch

from alphaquant import ops, reference as ref

SCHEMES = [("int2", True, 128), ("int2", False, 64), ("int4", True, 128), ("int4", False, 32), ("int6", True, 128),
           ("int8", True, 0), ("int8", False, 128), ("int3", True, 50), ("fp8_e4m3", True, 0), ("fp8_e5m2", True, 128),
           ("fp4_e2m1", True, 32), ("fp6_e2m3", True, -1), ("int4", True, -1), ("nf4", True, 64), ("nf4", True, 10)]


@pytest.mark.parametrize("fmt,sym,group_size", SCHEMES)
@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize("k,n", [(256, 33), (300, 7)])  # K a multiple / not a multiple of the group, odd N
def test_linear_matches_dequantize_then_linear(fmt, sym, group_size, m, k, n, device):
    w = torch.randn(n, k)
    packed, s, z = ops.quantize(w.to(device), fmt, symmetric=sym, group_size=group_size)
    zp = z if z.numel() else None
    x = torch.randn(m, k)
    bias = torch.randn(n)
    y = ops.linear(x.to(device), packed, s, zp, bias.to(device), fmt, symmetric=sym, group_size=group_size, k=k)
    want = ref.linear(x, packed, s, zp, bias, fmt, sym, group_size, k)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.cpu() - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16, 40])
def test_linear_half_activations(dtype, m, device):
    k, n = 512, 96
    packed, s, _ = ops.quantize(torch.randn(n, k, device=device), "int4", group_size=128)
    x = torch.randn(2, m, k).to(dtype)
    bias = torch.randn(n)  # m = 40: the GEMM path, in bf16 for bf16 activations on CPUs with AVX-512 BF16
    y = ops.linear(x.to(device), packed, s, None, bias.to(device), "int4", group_size=128, k=k)
    assert y.shape == (2, m, n) and y.dtype == dtype
    want = ref.linear(x.reshape(-1, k), packed, s, None, bias, "int4", True, 128, k).reshape(2, m, n)
    assert ((y.cpu().float() - want).norm() / want.norm()).item() < 1e-2  # bf16 output rounding


def test_linear_non_contiguous_x(device):
    packed, s, _ = ops.quantize(torch.randn(16, 64, device=device), "int4", group_size=32)
    x = torch.randn(64, 5, device=device).t()
    y = ops.linear(x, packed, s, None, None, "int4", group_size=32, k=64)
    want = ref.linear(x.cpu().contiguous(), packed, s, None, None, "int4", True, 32, 64)
    assert torch.allclose(y.cpu(), want, rtol=1e-5, atol=1e-5)


def test_linear_compiles_fullgraph():
    packed, s, z = ops.quantize(torch.randn(32, 64), "int4", symmetric=False, group_size=32)

    def f(x):
        return torch.relu(ops.linear(x, packed, s, z, None, "int4", symmetric=False, group_size=32, k=64)) * 2

    x = torch.randn(3, 64)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), f(x))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "mxfp8_e4m3", "mxfp8_e5m2", "fp6_e3m2", "fp6_e2m3",
                                 "mxfp6_e3m2", "mxfp6_e2m3"])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_linear_every_fp8_and_fp6_code(fmt, m, device):
    # the CPU kernel decodes FP8 and FP6 with F16C (subnormals, signs, NaN and Inf codes included);
    # row 0 holds every code, the other rows only finite ones
    n, k, group = 9, 512, 32 if fmt.startswith("mx") else 0
    bits = 8 if "fp8" in fmt else 6
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, generator=g)
    codes[0, :2 ** bits] = torch.arange(2 ** bits, dtype=torch.uint8)
    finite = ref.decode_float(codes, fmt.removeprefix("mx")).isfinite()
    finite[0] = True
    codes = torch.where(finite, codes, torch.zeros_like(codes))
    _, scale, _ = ops.quantize(torch.randn(n, k), fmt, symmetric=True, group_size=group)
    x = torch.randn(m, k)
    packed = ops.pack(codes, bits)
    y = ops.linear(x.to(device), packed.to(device), scale.to(device), None, None, fmt, symmetric=True,
                   group_size=group, k=k, validate=False).cpu()
    want = ref.linear(x, packed, scale, None, None, fmt, True, group, k)
    assert torch.equal(y[:, 0].isnan(), want[:, 0].isnan())
    torch.testing.assert_close(y[:, 1:], want[:, 1:], rtol=1e-5, atol=1e-4)
