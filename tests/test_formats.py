"""Bit-exactness of the float-format codecs against torch's casts and ml_dtypes."""
import ml_dtypes
import numpy as np
import pytest
import torch

from alphaquant import ops, reference as ref
from alphaquant.formats import CODEBOOK_FORMATS, FLOAT_FORMATS, format_bits

TORCH_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
ML_DTYPES = {
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
}
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """The same NaN positions and, everywhere else, the same bit patterns (so -0.0 != 0.0)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.isnan(), b.isnan())
    keep = ~a.isnan()
    int_dtype = _SAME_WIDTH_INT[a.dtype]
    assert torch.equal(a[keep].view(int_dtype), b[keep].view(int_dtype))


def test_assert_bits_equal_is_strict():
    nan = float("nan")
    assert_bits_equal(torch.tensor([1.0, nan, -0.0]), torch.tensor([1.0, nan, -0.0]))
    for a, b in [([1.0, nan], [2.0, nan]), ([0.0, 1.0], [-0.0, 1.0]), ([nan, 1.0], [1.0, 1.0])]:
        with pytest.raises(AssertionError):
            assert_bits_equal(torch.tensor(a), torch.tensor(b))


def float32_sample(n_random: int = 1 << 20, seed: int = 0) -> torch.Tensor:
    """Random bit patterns plus every sign/exponent with edge mantissas (ties, subnormals, Inf, NaN)."""
    g = torch.Generator().manual_seed(seed)
    rnd = torch.randint(-(2**31), 2**31 - 1, (n_random,), generator=g, dtype=torch.int64)
    top = torch.arange(0, 1 << 9, dtype=torch.int64) << 23  # sign + exponent
    mant = torch.tensor([0, 1, 2, 3, 0x7FFFF, 0x80000, 0x80001, 0xFFFFF, 0x100000, 0x100001, 0x17FFFF,
                         0x180000, 0x180001, 0x200000, 0x27FFFF, 0x280000, 0x400000, 0x400001, 0x7FFFFF],
                        dtype=torch.int64)
    edge = (top[:, None] | mant[None, :]).flatten()
    bits = torch.cat([rnd, edge])
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("fmt", list(TORCH_FP8))
def test_fp8_encode_matches_torch_cast(fmt, device):
    x = float32_sample().to(device)
    ours = ops.encode_float(x, fmt).cpu()
    theirs = x.cpu().to(TORCH_FP8[fmt]).view(torch.uint8)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("fmt", list(TORCH_FP8))
def test_fp8_decode_all_codes_matches_torch(fmt, device):
    codes = torch.arange(256, dtype=torch.uint8)
    ours = ops.decode_float(codes.to(device), fmt, torch.float32).cpu()
    theirs = codes.view(TORCH_FP8[fmt]).to(torch.float32)
    assert_bits_equal(ours, theirs)  # signed zeros too


@pytest.mark.parametrize("fmt", list(ML_DTYPES))
def test_small_float_encode_matches_ml_dtypes(fmt, device):
    x = float32_sample()
    x = x[torch.isfinite(x)]  # these formats hold no NaN/Inf: rejected, tested in test_errors
    ours = ops.encode_float(x.to(device), fmt).cpu().numpy()
    theirs = x.numpy().astype(ML_DTYPES[fmt]).view(np.uint8)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("fmt", list(ML_DTYPES))
def test_small_float_decode_all_codes_matches_ml_dtypes(fmt, device):
    bits = ref.FLOAT_INFO[fmt].bits
    codes = torch.arange(1 << bits, dtype=torch.uint8)
    ours = ops.decode_float(codes.to(device), fmt).cpu().numpy()
    theirs = codes.numpy().view(ML_DTYPES[fmt]).astype(np.float32)
    np.testing.assert_array_equal(ours.view(np.int32), theirs.view(np.int32))


@pytest.mark.parametrize("fmt", FLOAT_FORMATS)
def test_reference_codec_matches_kernel(fmt):
    x = float32_sample(1 << 16)
    if not ref.FLOAT_INFO[fmt].has_nan:
        x = x[torch.isfinite(x)]
    assert torch.equal(ops.encode_float(x, fmt), ref.encode_float(x, fmt))


@pytest.mark.parametrize("fmt", FLOAT_FORMATS + CODEBOOK_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_encode_half_inputs_equal_float32_path(fmt, dtype, device):
    x = (torch.randn(4099) * 30).to(dtype)
    assert torch.equal(ops.encode_float(x.to(device), fmt).cpu(), ops.encode_float(x.float(), fmt))


@pytest.mark.parametrize("fmt", FLOAT_FORMATS + CODEBOOK_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_output_dtype(fmt, dtype, device):
    codes = torch.arange(1 << format_bits(fmt), dtype=torch.uint8, device=device)
    out = ops.decode_float(codes, fmt, dtype)
    assert out.dtype == dtype
    expected = ops.decode_float(codes.cpu(), fmt, torch.float32).to(dtype)
    assert_bits_equal(out.cpu(), expected)
