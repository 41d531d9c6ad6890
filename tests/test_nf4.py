"""nf4, the 16-value NormalFloat code book: kernels against the reference and against bitsandbytes."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from alphaquant import ops, reference as ref
from alphaquant.formats import NF4_VALUES, format_bits, format_max
from alphaquant.quantizers import NF4Config, NF4Quantizer
from alphaquant.quantizers.registry import create_quantizer_from_scheme
from test_formats import assert_bits_equal, float32_sample

# As bitsandbytes defines them (bitsandbytes.functional.get_4bit_type("nf4")), code 0..15.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]
TABLE = torch.tensor(BNB_NF4, dtype=torch.float32)
MIDPOINTS = (TABLE[:-1] + TABLE[1:]) / 2
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GROUPS = [64, 32, 10, 0, -1]  # groups, unaligned groups, per-channel, per-tensor


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert torch.equal(x.cpu(), y.cpu())


def _expand(scale, rows, k, group_size):
    """[rows, groups] scales ([1, 1] per tensor) -> [rows, k], one per element."""
    if group_size == -1:
        return scale.reshape(()).expand(rows, k)
    g = k if group_size <= 0 or group_size >= k else group_size
    return scale.repeat_interleave(g, -1)[:, :k]


# ---------------------------------------------------------------- the table and the codec

def test_table_is_bitsandbytes_nf4(device):
    assert list(NF4_VALUES) == BNB_NF4
    assert format_bits("nf4") == 4 and format_max("nf4") == 1.0
    values = ops.decode_float(torch.arange(16, dtype=torch.uint8, device=device), "nf4").cpu()
    assert_bits_equal(values, TABLE)  # +0.0 at code 7, not -0.0
    assert_bits_equal(ref.decode_codebook(torch.arange(16, dtype=torch.uint8), "nf4"), TABLE)


def test_encode_matches_reference_and_is_nearest(device):
    x = float32_sample(1 << 16)
    x = torch.cat([x[torch.isfinite(x)], torch.rand(1 << 16) * 2.4 - 1.2])
    codes = ops.encode_float(x.to(device), "nf4").cpu()
    assert torch.equal(codes, ref.encode_codebook(x, "nf4"))
    # nearest value, in exact (float64) arithmetic, wherever x is not within an ulp of a midpoint
    d = (x.double()[:, None] - TABLE.double()[None, :]).abs()
    best = d.min(1).values
    chosen = d.gather(1, codes.long()[:, None]).squeeze(1)
    assert (chosen <= best + 1e-7 * x.double().abs().clamp(min=1.0)).all()


def test_midpoints_take_the_lower_code_and_ends_saturate(device):
    # ties as bitsandbytes breaks them: only x > midpoint moves up
    up = torch.nextafter(MIDPOINTS, torch.tensor(2.0))
    down = torch.nextafter(MIDPOINTS, torch.tensor(-2.0))
    x = torch.cat([MIDPOINTS, up, down, TABLE, torch.tensor([-0.0, -3.0, 1.5, 1e30, -1e30])])
    codes = ops.encode_float(x.to(device), "nf4").cpu().long()
    lower = torch.arange(15)
    assert torch.equal(codes[:15], lower) and torch.equal(codes[15:30], lower + 1)
    assert torch.equal(codes[30:45], lower) and torch.equal(codes[45:61], torch.arange(16))
    assert codes[61:].tolist() == [7, 0, 15, 15, 0]


# ---------------------------------------------------------------- quantize / dequantize / fake_quantize

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("k", [1, 7, 17, 77, 1025])
def test_quantize_matches_reference(dtype, group_size, k, device):
    x = (torch.randn(3, k) * 2).to(dtype)
    got = ops.quantize(x.to(device), "nf4", group_size=group_size)
    want = ref.quantize(x, "nf4", True, group_size)
    _same(got, want)
    packed, scale, zero = (t.cpu() for t in got)
    assert zero.numel() == 0  # scale only
    codes = ops.unpack(packed, 4, k)
    assert torch.equal(codes, ref.quantize_codes(x, "nf4", True, group_size)[0])
    # the scale is the group's max|x| exactly (format max 1.0)
    amax = x.float().abs().amax() if group_size == -1 else None
    if amax is not None:
        assert torch.equal(scale.reshape(()), amax if amax > 0 else torch.tensor(1.0))
    # dequantized values are exactly table[code] * scale
    deq = ops.dequantize(got[0], got[1], None, "nf4", group_size=group_size, k=k, dtype=torch.float32).cpu()
    assert torch.equal(deq, TABLE[codes.long()] * _expand(scale, 3, k, group_size))
    deq_t = ops.dequantize(got[0], got[1], None, "nf4", group_size=group_size, k=k, dtype=dtype).cpu()
    assert torch.equal(deq_t, ref.dequantize(packed, scale, None, "nf4", True, group_size, k, dtype))
    fq = ops.fake_quantize(x.to(device), "nf4", group_size=group_size)
    assert torch.equal(fq.cpu(), deq_t)


@pytest.mark.parametrize("group_size", [64, 10, 0, -1])
def test_group_scale_is_absmax(group_size, device):
    x = torch.randn(4, 130)
    _, s, _ = ops.quantize(x.to(device), "nf4", group_size=group_size)
    if group_size == -1:
        want = x.abs().amax().reshape(1, 1)
    else:
        g = 130 if group_size == 0 else group_size
        want = torch.stack([x[:, i:i + g].abs().amax(1) for i in range(0, 130, g)], 1)
    assert torch.equal(s.cpu(), want)


@pytest.mark.parametrize("group_size", [32, 10, -1])
def test_static_scales(group_size, device):
    x = torch.randn(6, 64)
    _, s, _ = ref.quantize(x * 0.7, "nf4", True, group_size)  # smaller scales: values beyond +-1 saturate
    got = ops.quantize(x.to(device), "nf4", group_size=group_size, scale=s.to(device))
    _same(got, ref.quantize(x, "nf4", True, group_size, scale=s))
    fq = ops.fake_quantize(x.to(device), "nf4", group_size=group_size, scale=s.to(device))
    assert torch.equal(fq.cpu(), ref.fake_quantize(x, "nf4", True, group_size, scale=s))


def test_zero_and_constant_groups(device):
    x = torch.zeros(2, 64)
    x[1] = -3.25
    p, s, _ = ops.quantize(x.to(device), "nf4", group_size=32)
    assert torch.equal(s.cpu(), torch.tensor([[1.0, 1.0], [3.25, 3.25]]))
    y = ops.dequantize(p, s, None, "nf4", group_size=32, k=64).cpu()
    assert torch.equal(y, x)  # 0 and -max are table values


# ---------------------------------------------------------------- stochastic rounding

@pytest.mark.parametrize("group_size", [32, 10, 0, -1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_matches_reference_and_repeats(group_size, dtype, device):
    x = torch.randn(5, 100).to(dtype)
    a = ops.quantize(x.to(device), "nf4", group_size=group_size, stochastic=True, seed=123)
    _same(a, ref.quantize(x, "nf4", True, group_size, stochastic=True, seed=123))
    _same(a, ops.quantize(x.to(device), "nf4", group_size=group_size, stochastic=True, seed=123))
    b = ops.quantize(x.to(device), "nf4", group_size=group_size, stochastic=True, seed=124)
    assert not torch.equal(a[0].cpu(), b[0].cpu())
    fq = ops.fake_quantize(x.to(device), "nf4", group_size=group_size, stochastic=True, seed=123)
    assert torch.equal(fq.cpu(), ref.fake_quantize(x, "nf4", True, group_size, stochastic=True, seed=123))


def test_stochastic_rounds_to_the_neighbours_without_bias():
    # 0.3 lies between table values 0.24611... (code 10) and 0.33791... (code 11)
    lo, hi = BNB_NF4[10], BNB_NF4[11]
    x = torch.full((1, 40000), 0.3)
    y = ops.fake_quantize(x, "nf4", group_size=0, scale=torch.ones(1, 1), stochastic=True, seed=1)
    assert set(y.unique().tolist()) == {lo, hi}
    p_up = (0.3 - lo) / (hi - lo)
    assert abs((y == hi).float().mean().item() - p_up) < 0.01
    assert abs(y.mean().item() - 0.3) < 0.001
    # table values and saturated values never move
    x = torch.cat([TABLE, torch.tensor([1.7, -2.0])]).reshape(1, -1)
    y = ops.fake_quantize(x, "nf4", group_size=0, scale=torch.ones(1, 1), stochastic=True, seed=9)
    assert torch.equal(y, torch.cat([TABLE, torch.tensor([1.0, -1.0])]).reshape(1, -1))


# ---------------------------------------------------------------- linear

@pytest.mark.parametrize("group_size", [64, 10, 0, -1])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("k,n", [(256, 33), (300, 7)])  # K a multiple / not a multiple of the group
def test_linear_matches_dequantize_then_linear(group_size, m, k, n, device):
    w = torch.randn(n, k)
    packed, s, _ = ops.quantize(w.to(device), "nf4", group_size=group_size)
    x, bias = torch.randn(m, k), torch.randn(n)
    y = ops.linear(x.to(device), packed, s, None, bias.to(device), "nf4", group_size=group_size, k=k)
    wd = ops.dequantize(packed, s, None, "nf4", group_size=group_size, k=k).cpu()
    want = F.linear(x, wd, bias)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.cpu() - want).norm() / want.norm()).item() < 1e-5
    assert torch.allclose(want, ref.linear(x, packed, s, None, bias, "nf4", True, group_size, k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_half_activations(dtype, device):
    packed, s, _ = ops.quantize(torch.randn(48, 128, device=device), "nf4", group_size=64)
    x = torch.randn(2, 5, 128).to(dtype)
    y = ops.linear(x.to(device), packed, s, None, None, "nf4", group_size=64, k=128)
    assert y.shape == (2, 5, 48) and y.dtype == dtype
    want = ref.linear(x.reshape(-1, 128), packed, s, None, None, "nf4", True, 64, 128).reshape(2, 5, 48)
    assert ((y.cpu().float() - want).norm() / want.norm()).item() < 1e-2


def test_linear_compiles_fullgraph():
    packed, s, _ = ops.quantize(torch.randn(32, 64), "nf4", group_size=32)

    def f(x):
        return torch.relu(ops.linear(x, packed, s, None, None, "nf4", group_size=32, k=64)) * 2

    x = torch.randn(3, 64)
    assert torch.allclose(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_is_rejected(bad, device):
    x = torch.randn(4, 8, device=device)
    x[2, 3] = bad
    msg = "input contains NaN or Inf, which nf4 cannot represent"
    with pytest.raises(ValueError, match=msg):
        ops.quantize(x, "nf4", group_size=4)
    with pytest.raises(ValueError, match=msg):
        ops.quantize(x, "nf4", group_size=-1)
    with pytest.raises(ValueError, match=msg):
        ops.fake_quantize(x, "nf4", group_size=0)
    with pytest.raises(ValueError, match=msg):
        ops.quantize(x, "nf4", group_size=4, scale=torch.ones(4, 2, device=device))
    with pytest.raises(ValueError, match=msg):
        ops.encode_float(x, "nf4")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ref.quantize(x.cpu(), "nf4", True, 4)


def test_nf4_has_no_asymmetric_form_nor_zero_point():
    with pytest.raises(ValueError, match="code book format nf4 is symmetric by definition"):
        ops.quantize(torch.randn(4, 8), "nf4", symmetric=False)
    with pytest.raises(ValueError, match="code book format nf4 is symmetric by definition"):
        ops.quantize(torch.randn(4, 8, device="meta"), "nf4", symmetric=False)  # the fake kernel says the same
    with pytest.raises(ValueError, match="zero_point is only used by asymmetric int formats"):
        ops.quantize(torch.randn(4, 8), "nf4", group_size=0, scale=torch.ones(4, 1), zero_point=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="not a nf4 code"):
        ops.decode_float(torch.tensor([16], dtype=torch.uint8), "nf4")


def test_fake_kernel_shapes():
    m = torch.device("meta")
    p, s, z = ops.quantize(torch.randn(3, 5, 41, device=m), "nf4", group_size=16)
    assert p.shape == (3, 5, 21) and s.shape == (3, 5, 3) and z.shape == (0,)
    assert ops.linear(torch.randn(2, 41, device=m), p[0], s[0], None, None, "nf4", group_size=16, k=41).shape == (2, 5)
    assert ops.encode_float(torch.randn(7, device=m), "nf4").dtype == torch.uint8


# ---------------------------------------------------------------- property test

@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    k=st.integers(1, 150),
    group_size=st.sampled_from([-1, 0, 1, 3, 8, 16, 33, 64]),
    scale_pow=st.integers(-30, 30),
    stochastic=st.booleans(),
    seed=st.integers(0, 2**40),
)
def test_round_trip_fuzz(rows, k, group_size, scale_pow, stochastic, seed):
    g = torch.Generator().manual_seed(seed % 2**31)
    x = torch.randn(rows, k, generator=g) * (2.0**scale_pow)
    got = ops.quantize(x, "nf4", group_size=group_size, stochastic=stochastic, seed=seed)
    _same(got, ref.quantize(x, "nf4", True, group_size, stochastic=stochastic, seed=seed))
    codes = ops.unpack(got[0], 4, k).long()
    s = _expand(got[1], rows, k, group_size)
    y = ops.dequantize(got[0], got[1], None, "nf4", group_size=group_size, k=k)
    assert torch.equal(y, TABLE[codes] * s)
    # each value lands on one of the two table values around x / scale (the nearer one unless stochastic)
    v = (x / s).double()
    below = (TABLE.double()[None, None, :] <= v[..., None] + 1e-12).sum(-1).clamp(1, 15) - 1
    assert ((codes == below) | (codes == below + 1)).all()
    if not stochastic:
        d = (v[..., None] - TABLE.double()).abs()
        assert (d.gather(-1, codes[..., None]).squeeze(-1) <= d.min(-1).values + 1e-7).all()


# ---------------------------------------------------------------- against bitsandbytes

def _bnb_codes(w: torch.Tensor, blocksize: int = 64):
    """bitsandbytes' nf4 codes (in element order) and absmax of w, quantized on the CPU."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    b = packed.reshape(-1)
    # bitsandbytes puts the first code of a byte in its high nibble (ours: the low nibble)
    codes = torch.stack([b >> 4, b & 0xF], 1).reshape(-1)[: w.numel()]
    assert torch.equal(state.code.float(), TABLE)  # the same code book
    return codes.reshape(w.shape), state.absmax, state


def _reciprocal_disagrees(w: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Where bitsandbytes' x * (1 / absmax) and our x / absmax fall on different sides of a midpoint."""
    flat = w.reshape(-1)
    a = absmax.repeat_interleave(blocksize)[: flat.numel()]
    ours = torch.bucketize((flat / a).clamp(-1, 1), MIDPOINTS)
    theirs = torch.bucketize((flat * (1.0 / a)).clamp(-1, 1), MIDPOINTS)
    return (ours != theirs).reshape(w.shape)


@pytest.mark.parametrize("shape", [(64, 256), (3, 1024), (1000,), (1001,)])
def test_codes_and_absmax_equal_bitsandbytes_exactly(shape):
    # Every block's max|x| a power of two, so that bitsandbytes' x * (1 / absmax) equals our
    # x / absmax exactly, and values on the midpoints (ties) in every block.
    g = torch.Generator().manual_seed(0)
    w = torch.rand(shape, generator=g) * 2 - 1
    flat = w.reshape(-1)
    n = flat.numel()
    for b0 in range(0, n, 64):
        e = int(torch.randint(-8, 8, (), generator=g))
        blk = flat[b0:b0 + 64]
        blk.mul_(2.0**e * 0.999)
        blk[0] = -(2.0**e) if b0 % 128 else 2.0**e
        if blk.numel() > 16:
            blk[1:16] = MIDPOINTS * 2.0**e
    codes, absmax, _ = _bnb_codes(w)
    ours, scale, _ = ops.quantize(w, "nf4", group_size=64)
    assert torch.equal(ops.unpack(ours, 4, shape[-1]), codes)
    assert torch.equal(scale.reshape(-1), absmax)


@pytest.mark.parametrize("shape", [(256, 512), (7, 320)])
def test_codes_equal_bitsandbytes_on_random_weights(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    codes, absmax, state = _bnb_codes(w)
    ours, scale, _ = ops.quantize(w, "nf4", group_size=64)
    assert torch.equal(scale.reshape(-1), absmax)
    ours_codes = ops.unpack(ours, 4, shape[-1])
    # bitsandbytes multiplies by the reciprocal of absmax where we divide: an ulp apart, which
    # moves a code only for values within an ulp of a midpoint; those are the only differences
    explained = _reciprocal_disagrees(w, absmax, 64)
    assert torch.equal(ours_codes[~explained], codes[~explained])
    assert explained.sum() <= 2
    # and bitsandbytes reads our codes back to our values
    import bitsandbytes.functional as bnb_f

    deq = bnb_f.dequantize_4bit(*_to_bnb(ours_codes, state), quant_type="nf4")
    assert torch.equal(deq, ops.dequantize(ours, scale, None, "nf4", group_size=64, k=shape[-1]))


def _to_bnb(codes: torch.Tensor, state):
    """Our codes in bitsandbytes' byte layout (first code in the high nibble), with its state."""
    c = codes.reshape(-1)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    return ((c[0::2] << 4) | c[1::2]).reshape(-1, 1), state


# ---------------------------------------------------------------- quantizer, registry, plans, checkpoints

def test_quantizer_packs_four_bits_with_group_64():
    q = NF4Quantizer(NF4Config(dtype="float32"))
    assert q.fmt == "nf4" and q.config.group_size == 64
    w = torch.randn(48, 256)
    p = q.quantize_weight(w)
    assert p.fmt == "nf4" and p.zero_point is None and p.data.shape == (48, 128)
    assert p.nbytes == 48 * 128 + 48 * 4 * 4 and p.bits_per_value == 4.5
    assert torch.equal(p.dequantize(), ref.dequantize(p.data, p.scale, None, "nf4", True, 64, 256))
    rel = ((p.dequantize() - w).norm() / w.norm()).item()
    assert rel < 0.1  # nf4 on normal weights, group 64 (int4 symmetric, group 64: ~0.11)


def test_config_validation():
    with pytest.raises(ValueError, match="NF4Config.format must be one of"):
        NF4Config(format="fp4")
    with pytest.raises(ValueError, match="NF4Config.group_size"):
        NF4Config(group_size=0)
    with pytest.raises(ValueError, match="zero_opt"):
        NF4Config(zero_opt=True)


def test_registry_and_activations():
    (WQ, WCfg), (AQ, ACfg) = create_quantizer_from_scheme({"wq": "nf4", "aq": "nf4"}, "float16")
    assert WQ is NF4Quantizer and issubclass(WCfg, NF4Config) and WCfg().dtype == "float16"
    x = torch.randn(4, 64)
    y = AQ(ACfg(group_size=32)).quantize_activation(x)
    assert y.dtype == torch.float16
    assert torch.equal(y, ref.fake_quantize(x, "nf4", True, 32).half())


def test_clip_search_and_observers_work_for_nf4():
    w = torch.randn(64, 256)
    w[::5, ::9] *= 6
    err = {cs: (NF4Quantizer(NF4Config(clip_search=cs, dtype="float32")).quantize_weight(w).dequantize() - w).norm()
           for cs in (False, True)}
    assert err[True] < err[False]
    from alphaquant.quantizers import MinMaxObserver

    q = NF4Quantizer(NF4Config(granularity="per_tensor", dtype="float32"))
    q.attach_observer(MinMaxObserver())
    q.observer.observe(w)
    q.calibrate_finish()
    assert torch.equal(q.static_scale.reshape(()), w.abs().max())


def test_plan_quant_linear_and_checkpoint_round_trip(tmp_path):
    from alphaquant.checkpoint_file import load_quantized, save_quantized
    from alphaquant.nn import QuantLinear
    from alphaquant.plans import apply_plan

    plan = {"default": {"wq": "nf4", "aq": "none", "group_size": 64, "dtype": "float32"}}

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(128, 40), nn.ReLU(), nn.Linear(40, 8))

    m = model()
    report = apply_plan(m, plan)
    assert all(isinstance(m[i], QuantLinear) and m[i].fmt == "nf4" for i in (0, 2))
    assert report is not None
    x = torch.randn(5, 128)
    layer = m[0]
    want = F.linear(x, layer.dequantized_weight(torch.float32), layer.bias)
    assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-5)
    path = str(tmp_path / "m.safetensors")
    save_quantized(m, path, plan)
    fresh = model()
    load_quantized(fresh, path)
    assert torch.equal(fresh(x), m(x))
