"""quantize / dequantize / fake_quantize against the pure-PyTorch reference, bit for bit."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from alphaquant import ops, reference as ref
from alphaquant.formats import CODEBOOK_FORMATS, FLOAT_FORMATS, INT_FORMATS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCHEMES = ([(f, True) for f in INT_FORMATS if f != "int1"] + [(f, False) for f in INT_FORMATS]
           + [(f, True) for f in FLOAT_FORMATS + CODEBOOK_FORMATS])
GROUPS = [32, 10, 0, -1]  # groups (with a short last one), unaligned groups, per-channel, per-tensor


def _zp(z):
    return z if z.numel() else None


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert torch.equal(x.cpu(), y.cpu())


@pytest.mark.parametrize("fmt,sym", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUPS)
def test_quantize_matches_reference(fmt, sym, dtype, group_size, device):
    x = (torch.randn(5, 77) * 3).to(dtype)
    got = ops.quantize(x.to(device), fmt, symmetric=sym, group_size=group_size)
    want = ref.quantize(x, fmt, sym, group_size)
    assert_same(got, want)
    deq = ops.dequantize(got[0], got[1], _zp(got[2]), fmt, symmetric=sym, group_size=group_size, k=77, dtype=dtype)
    assert torch.equal(deq.cpu(), ref.dequantize(*want, fmt, sym, group_size, 77, dtype))
    fq = ops.fake_quantize(x.to(device), fmt, symmetric=sym, group_size=group_size)
    assert torch.equal(fq.cpu(), deq.cpu())


@pytest.mark.parametrize("fmt,sym", [("int4", True), ("int4", False), ("int2", False), ("fp4_e2m1", True),
                                     ("fp8_e4m3", True), ("int6", True), ("nf4", True)])
@pytest.mark.parametrize("k", [1, 7, 17, 1025])
def test_odd_sizes(fmt, sym, k, device):
    x = torch.randn(3, k)
    assert_same(ops.quantize(x.to(device), fmt, symmetric=sym, group_size=16), ref.quantize(x, fmt, sym, 16))


@pytest.mark.parametrize("fmt,sym", [("int4", True), ("int3", False), ("fp6_e2m3", True), ("int8", False),
                                     ("nf4", True)])
def test_stochastic_matches_reference_and_repeats(fmt, sym, device):
    x = torch.randn(4, 100)
    a = ops.quantize(x.to(device), fmt, symmetric=sym, group_size=32, stochastic=True, seed=123)
    assert_same(a, ref.quantize(x, fmt, sym, 32, stochastic=True, seed=123))
    assert_same(a, ops.quantize(x.to(device), fmt, symmetric=sym, group_size=32, stochastic=True, seed=123))
    b = ops.quantize(x.to(device), fmt, symmetric=sym, group_size=32, stochastic=True, seed=124)
    assert not torch.equal(a[0].cpu(), b[0].cpu())


def test_stochastic_rounding_is_unbiased():
    x = torch.full((1, 20000), 0.3)
    scale = torch.ones(1, 1)
    y = ops.fake_quantize(x, "int4", group_size=0, scale=scale, stochastic=True, seed=1)
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert abs(y.mean().item() - 0.3) < 0.02


@pytest.mark.parametrize("fmt,sym", [("int4", True), ("int4", False), ("fp8_e4m3", True), ("fp4_e2m1", True),
                                     ("nf4", True)])
@pytest.mark.parametrize("group_size", [32, 0, -1])
def test_static_scales(fmt, sym, group_size, device):
    x = torch.randn(6, 64)
    _, s, z = ref.quantize(x * 2, fmt, sym, group_size)  # scales from other data: clipping happens
    zp = _zp(z)
    got = ops.quantize(x.to(device), fmt, symmetric=sym, group_size=group_size, scale=s.to(device),
                       zero_point=None if zp is None else zp.to(device))
    want = ref.quantize(x, fmt, sym, group_size, scale=s, zero_point=zp)
    assert_same(got, want)


def test_seed_ranges_are_as_documented():
    x = torch.linspace(-1, 1, 64).reshape(1, 64)
    for bits in (2, 4, 6, 8):
        codes, s, _ = ref.quantize_codes(x, f"int{bits}", True, 0)
        q = codes.to(torch.int64) - 2 ** (bits - 1)
        assert q.max() == 2 ** (bits - 1) - 1 and q.min() == -(2 ** (bits - 1) - 1)
        assert torch.allclose(s, torch.tensor([[1.0 / (2 ** (bits - 1) - 1)]]))
        codes, s, z = ref.quantize_codes(x, f"int{bits}", False, 0)
        assert codes.min() == 0 and codes.max() == 2**bits - 1
        assert torch.allclose(z, torch.tensor([[0 - (-1.0) / s.item()]]))


def test_all_zero_and_constant_groups(device):
    x = torch.zeros(2, 64)
    x[1] = 3.25
    for fmt, sym in [("int4", True), ("int4", False), ("fp8_e4m3", True)]:
        p, s, z = ops.quantize(x.to(device), fmt, symmetric=sym, group_size=32)
        assert torch.isfinite(s).all()
        y = ops.dequantize(p, s, _zp(z), fmt, symmetric=sym, group_size=32, k=64)
        assert torch.equal(y[0].cpu(), torch.zeros(64))
        if not sym:
            assert torch.equal(y[1].cpu(), x[1])  # a constant group is exact with a zero point


def test_non_contiguous_input(device):
    x = torch.randn(64, 48, device=device).t()  # [48, 64], not contiguous
    assert_same(ops.quantize(x, "int4", group_size=16), ref.quantize(x.cpu().contiguous(), "int4", True, 16))


def test_batched_leading_dims(device):
    x = torch.randn(2, 3, 40)
    got = ops.quantize(x.to(device), "int4", symmetric=False, group_size=16)
    assert got[0].shape == (2, 3, 20) and got[1].shape == (2, 3, 3)
    assert_same(got, ref.quantize(x, "int4", False, 16))


def test_fp8_keeps_nan_and_inf():
    x = torch.tensor([[1.0, float("nan"), float("inf"), -2.0]])
    y = ops.fake_quantize(x, "fp8_e5m2", group_size=0)
    assert torch.isnan(y[0, 1]) and y[0, 2] == float("inf") and y[0, 3] == -2.0
    y = ops.fake_quantize(x, "fp8_e4m3", group_size=0)
    assert torch.isnan(y[0, 1]) and y[0, 2] == 2.0  # saturates to 448 * scale (scale from finite max 2/448)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1", "fp6_e3m2", "nf4"])
def test_float_error_is_within_half_ulp_of_format(fmt):
    x = torch.randn(8, 256)
    y = ops.fake_quantize(x, fmt, group_size=32)
    rel = ((x - y).norm() / x.norm()).item()
    assert rel < {"fp8_e4m3": 0.04, "fp4_e2m1": 0.2, "fp6_e3m2": 0.08, "nf4": 0.1}[fmt]


def test_fake_quantize_straight_through_gradient():
    x = torch.randn(4, 32, requires_grad=True)
    y = ops.fake_quantize(x, "int4", group_size=16)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@settings(max_examples=40, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    rows=st.integers(1, 5),
    k=st.integers(1, 200),
    group_size=st.sampled_from([-1, 0, 1, 3, 8, 16, 33, 64, 128]),
    scale_pow=st.integers(-20, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_fuzz(scheme, rows, k, group_size, scale_pow, seed):
    fmt, sym = scheme
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * (2.0**scale_pow)
    got = ops.quantize(x, fmt, symmetric=sym, group_size=group_size)
    assert_same(got, ref.quantize(x, fmt, sym, group_size))
    y = ops.dequantize(got[0], got[1], _zp(got[2]), fmt, symmetric=sym, group_size=group_size, k=k)
    assert torch.equal(y, ops.fake_quantize(x, fmt, symmetric=sym, group_size=group_size))
    # every value lands within one step of the grid (half a step for round-to-nearest ints)
    if fmt.startswith("int"):
        step = got[1].repeat_interleave(k if group_size in (-1, 0) or group_size >= k else group_size, -1)
        step = step.expand(rows, -1)[:, :k] if group_size != -1 else got[1].reshape(()).expand(rows, k)
        assert ((x - y).abs() <= step * 0.5 * (1 + 1e-5) + 1e-30).all()


F32_MAX = torch.finfo(torch.float32).max
# both signs near the float32 limit: max - min overflows float32
EXTREMES = torch.tensor([[-F32_MAX, F32_MAX, 0.0, 1.0, F32_MAX * 0.999, -F32_MAX * 0.7, F32_MAX / 3, -1e30],
                         [F32_MAX, 2.0, -F32_MAX, 1e38, -3e38, 5.0, 0.0, -1.0]])


@pytest.mark.parametrize("fmt,sym", SCHEMES)
@pytest.mark.parametrize("group_size", [0, -1, 4])
def test_values_near_float32_max(fmt, sym, group_size, device):
    x = EXTREMES
    got = ops.quantize(x.to(device), fmt, symmetric=sym, group_size=group_size)
    assert_same(got, ref.quantize(x, fmt, sym, group_size))
    packed, s, z = (t.cpu() for t in got)
    assert torch.isfinite(s).all() and (s > 0).all() and torch.isfinite(z).all()
    y = ops.dequantize(got[0], got[1], _zp(got[2]), fmt, symmetric=sym, group_size=group_size, k=8).cpu()
    assert torch.isfinite(y).all()
    assert torch.equal(y, ref.dequantize(packed, s, _zp(z), fmt, sym, group_size, 8))
    # values much larger than a step keep their sign (the overflowed range used to flip them)
    step = s.reshape(-1)[0] if group_size == -1 else s.repeat_interleave(8 if group_size == 0 else 4, -1)
    big = x.abs() > step
    assert (torch.sign(y[big]) == torch.sign(x[big])).all()
    if fmt != "int1" and fmt.startswith("int"):  # int1 has no finite scale for a range over float32 max
        assert ((x - y).abs() <= step * 0.5 * (1 + 1e-5)).all()


def test_overflowing_range_scale_formula():
    # max - min is not finite: scale = max / (qmax - qmin) - min / (qmax - qmin), in float32
    mx, mn = torch.tensor(F32_MAX), torch.tensor(-F32_MAX)
    _, s, z = ops.quantize(torch.stack([mn, mx]).reshape(1, 2), "int8", symmetric=False, group_size=0)
    steps = torch.tensor(255.0)
    assert torch.equal(s.reshape(()), mx / steps - mn / steps)
    assert torch.equal(z.reshape(()), 0 - mn / s.reshape(()))
    _, s1, _ = ops.quantize(torch.stack([mn, mx]).reshape(1, 2), "int1", symmetric=False, group_size=0)
    assert s1.item() == F32_MAX  # one step cannot span it: the largest finite scale


@pytest.mark.parametrize("fmt,sym", [("int4", False), ("int8", True), ("fp8_e4m3", True), ("fp6_e2m3", True),
                                     ("nf4", True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_tensor_scale_of_large_inputs(fmt, sym, dtype):
    # larger than one thread's share of the per-tensor statistics pass, with the extremes at the ends
    x = torch.randn(257, 1031).to(dtype)
    x[0, 0], x[-1, -1] = -40, 50
    got = ops.quantize(x, fmt, symmetric=sym, group_size=-1)
    assert_same(got, ref.quantize(x, fmt, sym, -1))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_per_tensor_scale_ignores_nan_and_inf(fmt, device):
    x = torch.randn(33, 70)
    x[5, 6], x[30, 1], x[0, 0] = float("nan"), float("inf"), -float("inf")
    got = ops.quantize(x.to(device), fmt, group_size=-1)
    assert_same(got, ref.quantize(x, fmt, True, -1))
    amax = x[torch.isfinite(x)].abs().max()
    assert torch.equal(got[1].cpu().reshape(()), amax / torch.tensor(ref.FLOAT_INFO[fmt].max_value))


def _bytes_allocated_by(fn) -> int:
    """Bytes the CPU allocator hands out while fn runs (temporaries included), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages() if e.key != "[memory]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_tensor_quantize_makes_no_copy_of_the_input(dtype):
    x = torch.randn(256, 4096).to(dtype)
    used = _bytes_allocated_by(lambda: ops.quantize(x, "int4", group_size=-1))
    # the packed output is an eighth of float32 input: no float32 copy, mask or where() result
    assert used <= x.numel() // 2 + 4096


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(["int2", "int3", "int4", "int5", "int6", "int8"]),
    sym=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    groups=st.integers(1, 6),
    group_size=st.sampled_from([8, 16, 24, 64, 128]),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_vectorized_integer_path_matches_reference(fmt, sym, dtype, groups, group_size, ties, seed):
    # groups whose length is a multiple of 8 take the AVX2 loops of the CPU kernel; halves on a
    # grid with unit scale make exact ties, which must round to even as the scalar code does
    g = torch.Generator().manual_seed(seed)
    k = groups * group_size
    if ties:
        x = torch.randint(-16, 15, (3, k), generator=g).float() / 2
        x[:, ::group_size], x[:, 1::group_size] = -8.0, 7.0
    else:
        span = 4 if dtype == torch.float16 else 30  # float16 overflows past 65504
        x = torch.randn(3, k, generator=g) * torch.logspace(-span, span, 3).unsqueeze(1)
    x = x.to(dtype)
    for gs in (group_size, 0):
        assert_same(ops.quantize(x, fmt, symmetric=sym, group_size=gs), ref.quantize(x, fmt, sym, gs))


@pytest.mark.parametrize("fmt,sym,group", [("int4", True, 128), ("int4", False, 64), ("int2", False, 16),
                                           ("int8", True, 0), ("fp4_e2m1", True, 32), ("nf4", True, 64),
                                           ("mxfp4_e2m1", True, 32), ("nvfp4", True, 16)])
def test_dequantize_to_bf16_is_float32_rounded_to_nearest_even(fmt, sym, group):
    """The CPU kernels convert blocks of eight to bf16 in registers: the same bits as torch's cast of
    the float32 result (round to nearest even), and NaN where it is NaN (an MX block holding NaN)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 256, generator=g) * torch.exp2(torch.randint(-8, 8, (37, 1), generator=g).float())
    if fmt.startswith("mx"):
        x[3, 40] = float("nan")
    packed, s, z = ops.quantize(x, fmt, symmetric=sym, group_size=group)
    zp = z if z.numel() else None
    full = ops.dequantize(packed, s, zp, fmt, symmetric=sym, group_size=group, k=256)
    got = ops.dequantize(packed, s, zp, fmt, symmetric=sym, group_size=group, k=256, dtype=torch.bfloat16)
    nan = torch.isnan(full)
    assert torch.equal(torch.isnan(got), nan)  # NaN bits are not compared: torch's casts differ there
    assert torch.equal(got[~nan].view(torch.int16), full[~nan].bfloat16().view(torch.int16))
