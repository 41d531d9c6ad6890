"""Argument checks every op shares: one device for all tensors, the same checks in the fake (meta)
kernels as in the native ones, valid scales wherever scales are read, sizes that cannot overflow."""
import pytest
import torch

from alphaquant import ops
from conftest import DEVICES

NAN, INF = float("nan"), float("inf")


def _weight(fmt="int4", symmetric=True, group_size=16, n=8, k=32, device="cpu"):
    return ops.quantize(torch.randn(n, k, device=device), fmt, symmetric=symmetric, group_size=group_size)


# ---------------------------------------------------------------- one device

def _mixed_device_calls():
    """(description, call, message) for every op with more than one tensor, one tensor on meta."""
    x = torch.randn(4, 32)
    p, s, _ = _weight()
    pa, sa, za = _weight(symmetric=False)
    meta = torch.device("meta")
    q = ops.quantize
    yield "quantize scale", lambda: q(x, "int4", group_size=16, scale=s[:4].to(meta)), "scale is on meta but x is on cpu"
    yield "quantize x", lambda: q(x.to(meta), "int4", group_size=16, scale=s[:4]), "scale is on cpu but x is on meta"
    yield "quantize zero_point", lambda: q(x, "int4", symmetric=False, group_size=16, scale=sa[:4],
                                           zero_point=za[:4].to(meta)), "zero_point is on meta but x is on cpu"
    yield "fake_quantize scale", lambda: ops.fake_quantize(x, "int4", group_size=16, scale=s[:4].to(meta)), \
        "scale is on meta but x is on cpu"
    yield "dequantize scale", lambda: ops.dequantize(p, s.to(meta), None, "int4", group_size=16, k=32), \
        "scale is on meta but packed is on cpu"
    yield "dequantize packed", lambda: ops.dequantize(p.to(meta), s, None, "int4", group_size=16, k=32), \
        "scale is on cpu but packed is on meta"
    yield "dequantize zero_point", lambda: ops.dequantize(pa, sa, za.to(meta), "int4", symmetric=False,
                                                          group_size=16, k=32), "zero_point is on meta but packed is on cpu"
    yield "dequantize empty zero_point", lambda: ops.dequantize(p, s, torch.empty(0, device=meta), "int4",
                                                                group_size=16, k=32), "zero_point is on meta but packed is on cpu"
    lin = ops.linear
    yield "linear packed", lambda: lin(x, p.to(meta), s, None, None, "int4", group_size=16, k=32), \
        "packed is on meta but x is on cpu"
    yield "linear scale", lambda: lin(x, p, s.to(meta), None, None, "int4", group_size=16, k=32), \
        "scale is on meta but packed is on cpu"
    yield "linear zero_point", lambda: lin(x, pa, sa, za.to(meta), None, "int4", symmetric=False, group_size=16,
                                           k=32), "zero_point is on meta but packed is on cpu"
    yield "linear bias", lambda: lin(x, p, s, None, torch.zeros(8, device=meta), "int4", group_size=16, k=32), \
        "bias is on meta but x is on cpu"
    yield "linear x", lambda: lin(x.to(meta), p, s, None, None, "int4", group_size=16, k=32), \
        "packed is on cpu but x is on meta"
    cb = torch.linspace(-1, 1, 16)
    yield "dequantize_codebook codebook", lambda: ops.dequantize_codebook(p, s, cb.to(meta), group_size=16, k=32), \
        "codebook is on meta but packed is on cpu"
    yield "dequantize_codebook packed", lambda: ops.dequantize_codebook(p.to(meta), s, cb, group_size=16, k=32), \
        "scale is on cpu but packed is on meta"
    lcb = ops.linear_codebook
    yield "linear_codebook codebook", lambda: lcb(x, p, s, cb.to(meta), None, group_size=16, k=32), \
        "codebook is on meta but packed is on cpu"
    yield "linear_codebook bias", lambda: lcb(x, p, s, cb, torch.zeros(8, device=meta), group_size=16, k=32), \
        "bias is on meta but x is on cpu"
    yield "linear_codebook x", lambda: lcb(x.to(meta), p, s, cb, None, group_size=16, k=32), \
        "packed is on cpu but x is on meta"


@pytest.mark.parametrize("call,message", [pytest.param(c, m, id=n) for n, c, m in _mixed_device_calls()])
def test_tensors_on_another_device_are_rejected(call, message):
    # A meta tensor among CPU ones sends the call to the fake kernel, which must not return
    # uninitialized memory as if it had computed something.
    with pytest.raises(ValueError, match=f"{message}; every tensor argument must be on the same device"):
        call()


# ---------------------------------------------------------------- fake kernels check as the kernels do

def _bad_calls():
    """(id, op, args, exception, message) that the native kernels reject for their arguments alone."""
    x = torch.randn(4, 32)
    p, s, _ = _weight()
    pa, sa, za = _weight(symmetric=False)
    codes = torch.randint(0, 8, (3, 10), dtype=torch.uint8)
    E, T = ValueError, TypeError
    yield "pack bits", "pack", (codes, 9), E, "bits must be in 1..8; got 9"
    yield "pack dtype", "pack", (codes.int(), 3), T, "codes must be uint8"
    yield "pack empty", "pack", (codes[:, :0], 3), E, "non-empty tensor"
    yield "unpack bits", "unpack", (ops.pack(codes, 3), 0, 10), E, "bits must be in 1..8; got 0"
    yield "unpack k", "unpack", (ops.pack(codes, 3), 3, 11), E, "packed rows hold 4 bytes, but 11 codes of 3 bits take 5"
    yield "unpack k=0", "unpack", (ops.pack(codes, 3), 3, 0), E, r"k \(values per row\) must be > 0"
    yield "unpack huge k", "unpack", (ops.pack(codes, 3), 3, 2**62), E, "k=4611686018427387904 is too large"
    yield "encode int", "encode_float", (x, "int4"), E, "int4 is not a float format"
    yield "encode dtype", "encode_float", (x.int(), "fp8_e4m3"), T, "input must be float32, float16 or bfloat16"
    yield "decode format", "decode_float", (codes, "fp5", torch.float32), E, "unknown format 'fp5'"
    yield "decode dtype", "decode_float", (codes.float(), "fp4_e2m1", torch.float32), T, "codes must be uint8"
    yield "decode out dtype", "decode_float", (codes, "fp4_e2m1", torch.int32), T, "output dtype must be float32"
    q = (False, 0)  # stochastic, seed
    yield "quantize format", "quantize", (x, "int9", True, 16, None, None, *q), E, "unknown format 'int9'; allowed"
    yield "quantize asym float", "quantize", (x, "fp8_e4m3", False, 16, None, None, *q), E, "symmetric by definition"
    yield "quantize int1", "quantize", (x, "int1", True, 16, None, None, *q), E, "int1 has no symmetric form"
    yield "quantize dtype", "quantize", (x.int(), "int4", True, 16, None, None, *q), T, "input must be float32"
    yield "quantize group_size", "quantize", (x, "int4", True, -2, None, None, *q), E, "group_size must be > 0"
    yield "quantize scalar", "quantize", (x[0, 0], "int4", True, 16, None, None, *q), E, "at least one dimension"
    yield "quantize empty", "quantize", (x[:0], "int4", True, 16, None, None, *q), E, "input is empty"
    yield "quantize scale shape", "quantize", (x, "int4", True, 16, torch.ones(4, 3), None, *q), E, \
        r"scale has shape \[4, 3\]; expected \[4, 2\] for input shape \[4, 32\] with group_size=16"
    yield "quantize scale dtype", "quantize", (x, "int4", True, 16, torch.ones(4, 2, dtype=torch.int32), None, *q), \
        T, "scale must be a floating tensor"
    yield "quantize no zero_point", "quantize", (x, "int4", False, 16, torch.ones(4, 2), None, *q), E, \
        "need zero_point together with a given scale"
    yield "quantize zero_point alone", "quantize", (x, "int4", False, 16, None, torch.ones(4, 2), *q), E, \
        "zero_point was given without scale"
    yield "quantize zero_point symmetric", "quantize", (x, "int4", True, 16, torch.ones(4, 2), torch.ones(4, 2), *q), \
        E, r"zero_point is only used by asymmetric int formats; int4 \(symmetric=True\) takes none"
    yield "fake_quantize format", "fake_quantize", (x, "int0", True, 16, None, None, *q), E, "unknown format"
    yield "fake_quantize scale shape", "fake_quantize", (x, "int4", True, 0, torch.ones(4, 2), None, *q), E, \
        r"scale has shape \[4, 2\]; expected \[4, 1\]"
    d = (torch.float32,)
    yield "dequantize out dtype", "dequantize", (p, s, None, "int4", True, 16, 32, torch.int8), T, "output dtype"
    yield "dequantize packed dtype", "dequantize", (p.int(), s, None, "int4", True, 16, 32, *d), T, \
        "packed must be uint8"
    yield "dequantize k", "dequantize", (p, s, None, "int4", True, 16, 40, *d), E, \
        "packed rows hold 16 bytes, but 40 values of 4 bits take 20"
    yield "dequantize huge k", "dequantize", (p, s, None, "int4", True, 16, 2**61, *d), E, "too large for 8 row"
    p16, s16, _ = _weight(n=16)
    yield "dequantize rows x k overflow", "dequantize", (p16, s16, None, "int4", True, 16, 2**60 - 1, *d), E, \
        "too large for 16 row"
    yield "dequantize scale shape", "dequantize", (p, s[:, :1], None, "int4", True, 16, 32, *d), E, \
        r"scale has shape \[8, 1\]; expected \[8, 2\]"
    yield "dequantize no zero_point", "dequantize", (pa, sa, None, "int4", False, 16, 32, *d), E, \
        "asymmetric int4 needs zero_point"
    yield "dequantize zero_point symmetric", "dequantize", (p, s, torch.zeros_like(s), "int4", True, 16, 32, *d), E, \
        "zero_point is only used by asymmetric int formats"
    yield "dequantize group_size", "dequantize", (p, s, None, "int4", True, -3, 32, *d), E, "group_size must be > 0"
    lin = ("int4", True, 16, 32)
    yield "linear dtype", "linear", (x.int(), p, s, None, None, *lin), T, "input must be float32"
    yield "linear k", "linear", (x[:, :31], p, s, None, None, *lin), E, "x must have last dimension k=32"
    yield "linear packed 1-D", "linear", (x, p[0], s, None, None, *lin), E, "packed weight must be 2-D"
    yield "linear scale shape", "linear", (x, p, s[:4], None, None, *lin), E, r"scale has shape \[4, 2\]"
    yield "linear bias shape", "linear", (x, p, s, None, torch.zeros(7), *lin), E, r"bias must have shape \[8\]"
    yield "linear bias dtype", "linear", (x, p, s, None, torch.zeros(8, dtype=torch.int64), *lin), T, \
        "bias must be a floating tensor"
    yield "linear empty x", "linear", (x[:0], p, s, None, None, *lin), E, "x is empty"


def _to_meta(v):
    return v.to("meta") if isinstance(v, torch.Tensor) else v


@pytest.mark.parametrize("case", list(_bad_calls()), ids=lambda c: c[0])
def test_fake_kernels_reject_what_the_kernels_reject(case):
    _, name, args, exc, message = case
    op = getattr(torch.ops.alphaquant, name)
    with pytest.raises(exc, match=message):
        op(*args)  # the native CPU kernel
    with pytest.raises(exc, match=message):
        op(*[_to_meta(a) for a in args])  # the fake kernel


def test_fake_kernels_still_give_exact_shapes():
    m = torch.device("meta")
    x = torch.randn(3, 5, 40, device=m)
    p, s, z = ops.quantize(x, "int6", symmetric=False, group_size=16)
    assert p.shape == (3, 5, 30) and s.shape == (3, 5, 3) and z.shape == (3, 5, 3) and p.device == m
    y = ops.dequantize(p, s, z, "int6", symmetric=False, group_size=16, k=40, dtype=torch.bfloat16)
    assert y.shape == (3, 5, 40) and y.dtype == torch.bfloat16
    w, ws, _ = ops.quantize(torch.randn(7, 40, device=m), "fp4_e2m1", group_size=-1)
    assert ops.linear(x, w, ws, None, None, "fp4_e2m1", group_size=-1, k=40).shape == (3, 5, 7)
    assert ops.unpack(ops.pack(torch.zeros(2, 9, dtype=torch.uint8, device=m), 5), 5, 9).shape == (2, 9)


# ---------------------------------------------------------------- scales are checked where they are read

BAD_SCALES = [NAN, 0.0, -1.0, INF, -INF]


@pytest.mark.parametrize("bad", BAD_SCALES)
@pytest.mark.parametrize("fmt,sym,group_size", [("int4", True, 16), ("int4", False, 16), ("int3", True, 10),
                                                ("fp8_e4m3", True, 0), ("fp4_e2m1", True, -1), ("nf4", True, 10)])
def test_dequantize_rejects_bad_scales(fmt, sym, group_size, bad, device):
    p, s, z = _weight(fmt, sym, group_size, device=device)
    s = s.clone()
    s.view(-1)[-1] = bad
    zp = z if z.numel() else None
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        ops.dequantize(p, s, zp, fmt, symmetric=sym, group_size=group_size, k=32)
    # validate=False: the caller vouches for its scales; no check, no error
    ops.dequantize(p, s, zp, fmt, symmetric=sym, group_size=group_size, k=32, validate=False)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_dequantize_and_linear_reject_non_finite_zero_points(bad, device):
    p, s, z = _weight(symmetric=False, device=device)
    z = z.clone()
    z[3, 1] = bad
    with pytest.raises(ValueError, match="zero_point finite"):
        ops.dequantize(p, s, z, "int4", symmetric=False, group_size=16, k=32)
    for m in (1, 40):
        with pytest.raises(ValueError, match="zero_point finite"):
            ops.linear(torch.randn(m, 32, device=device), p, s, z, None, "int4", symmetric=False, group_size=16, k=32)


@pytest.mark.parametrize("bad", BAD_SCALES)
@pytest.mark.parametrize("m", [1, 5, 40])  # decode paths (vectorized and generic) and the GEMM path
@pytest.mark.parametrize("fmt,sym,group_size", [("int4", True, 16), ("int3", False, 16), ("fp8_e5m2", True, 0),
                                                ("int8", True, -1), ("nf4", True, 16)])
def test_linear_rejects_bad_scales(fmt, sym, group_size, m, bad, device):
    p, s, z = _weight(fmt, sym, group_size, device=device)
    s = s.clone()
    s.view(-1)[0] = bad
    zp = z if z.numel() else None
    x = torch.randn(m, 32, device=device)
    with pytest.raises(ValueError, match="alphaquant.(linear|dequantize): scale must be finite and > 0"):
        ops.linear(x, p, s, zp, None, fmt, symmetric=sym, group_size=group_size, k=32)
    y = ops.linear(x, p, s, zp, None, fmt, symmetric=sym, group_size=group_size, k=32, validate=False)
    assert y.shape == (m, 8)


def test_scale_rule_is_the_same_for_every_op():
    x = torch.randn(8, 32)
    p, s, _ = _weight()
    s = s.clone()
    s[2, 0] = 0.0
    calls = [lambda: ops.quantize(x, "int4", group_size=16, scale=s),
             lambda: ops.fake_quantize(x, "int4", group_size=16, scale=s),
             lambda: ops.dequantize(p, s, None, "int4", group_size=16, k=32),
             lambda: ops.linear(x, p, s, None, None, "int4", group_size=16, k=32)]
    for call in calls:
        with pytest.raises(ValueError, match=r"scale must be finite and > 0 everywhere \(and zero_point finite\)"):
            call()


# ---------------------------------------------------------------- sizes from user integers

@pytest.mark.parametrize("k", [2**61 + 1, 2**62, 2**63 - 1])
def test_unpack_huge_k_is_a_clear_error(k):
    # k * bits used to wrap around int64 to a tiny row length that matched the packed tensor
    packed = torch.zeros(1, 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match=f"k={k} is too large for 1 row"):
        ops.unpack(packed, 8, k)
    with pytest.raises(ValueError, match=f"k={k} is too large for 1 row"):
        ops.dequantize(packed, torch.ones(1, 1), None, "int8", group_size=0, k=k)


@pytest.mark.parametrize("device", DEVICES)
def test_largest_group_size_is_one_group_per_row(device):
    x = torch.randn(3, 20, device=device)
    a = ops.quantize(x, "int4", group_size=2**62)
    b = ops.quantize(x, "int4", group_size=0)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
