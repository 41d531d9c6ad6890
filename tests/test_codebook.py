"""Learned 4-bit code books (lut4): the native ops against the reference, the k-means quantizer,
QuantLinear, plans and checkpoints."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from alphaquant import ops, reference as ref
from alphaquant.formats import NF4_VALUES
from alphaquant.packed import PackedTensor
from alphaquant.quantizers import CodebookConfig, CodebookQuantizer, NF4Config, NF4Quantizer
from alphaquant.quantizers.codebook import fit_codebook, nearest_codes
from alphaquant.quantizers.registry import create_quantizer_from_scheme

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN, INF = float("nan"), float("inf")


def _weight(n, k, group_size, per_row, device="cpu", cb_dtype=torch.float32, seed=0):
    """Random codes, positive scales and a sorted code book (per tensor or per row)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed = ops.pack(codes, 4)
    scale = torch.rand(ops.scale_shape((n, k), group_size), generator=g) + 0.25
    cb = (torch.rand((n, 16) if per_row else (16,), generator=g) * 2 - 1).sort(-1).values.to(cb_dtype)
    return packed.to(device), scale.to(device), cb.to(device), codes


# ---------------------------------------------------------------- the ops

@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("group_size", [64, 10, 0, -1])
@pytest.mark.parametrize("k", [1, 7, 17, 130, 1025])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_codebook_matches_reference(per_row, group_size, k, dtype, device):
    packed, scale, cb, codes = _weight(3, k, group_size, per_row, device)
    y = ops.dequantize_codebook(packed, scale, cb, group_size=group_size, k=k, dtype=dtype)
    want = ref.dequantize_codebook(packed.cpu(), scale.cpu(), cb.cpu(), group_size, k, dtype)
    assert y.dtype == dtype and y.shape == (3, k)
    assert torch.equal(y.cpu(), want)
    # value = codebook[row or 0][code] * scale, exactly
    table = cb.cpu().float().expand(3, 16) if not per_row else cb.cpu().float()
    if dtype == torch.float32:
        s = scale.cpu().reshape(()).expand(3, k) if group_size == -1 else \
            scale.cpu().repeat_interleave(k if group_size in (0,) or group_size >= k else group_size, -1)[:, :k]
        assert torch.equal(y.cpu(), torch.gather(table, 1, codes.long()) * s)


def test_dequantize_codebook_leading_dims_and_half_codebook(device):
    packed, scale, cb, _ = _weight(6, 40, 16, True, device, cb_dtype=torch.float16)
    packed, scale, cb = packed.reshape(2, 3, 20), scale.reshape(2, 3, 3), cb.reshape(2, 3, 16)
    y = ops.dequantize_codebook(packed, scale, cb, group_size=16, k=40)
    assert y.shape == (2, 3, 40)
    assert torch.equal(y.cpu(), ref.dequantize_codebook(packed.cpu(), scale.cpu(), cb.cpu(), 16, 40))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("group_size", [64, 16, 10, 0, -1])
@pytest.mark.parametrize("m", [1, 3, 6, 17])  # decode paths (AVX2 four rows at a time, generic) and GEMM
@pytest.mark.parametrize("k,n", [(256, 33), (300, 7)])  # K a multiple / not a multiple of the group
def test_linear_codebook_matches_dequantize_then_linear(per_row, group_size, m, k, n, device):
    packed, scale, cb, _ = _weight(n, k, group_size, per_row, device)
    x, bias = torch.randn(m, k), torch.randn(n)
    y = ops.linear_codebook(x.to(device), packed, scale, cb, bias.to(device), group_size=group_size, k=k)
    want = ref.linear_codebook(x, packed, scale, cb, bias, group_size, k)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.cpu() - want).norm() / want.norm()).item() < 1e-5
    y0 = ops.linear_codebook(x.to(device), packed, scale, cb, None, group_size=group_size, k=k)
    assert torch.allclose(y0.cpu(), want - bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 40])
def test_linear_codebook_half_activations(dtype, m, device):
    packed, scale, cb, _ = _weight(48, 128, 64, False, device, cb_dtype=torch.float16)
    x = torch.randn(2, m, 128).to(dtype)
    y = ops.linear_codebook(x.to(device), packed, scale, cb, None, group_size=64, k=128)
    assert y.shape == (2, m, 48) and y.dtype == dtype
    want = ref.linear_codebook(x.reshape(-1, 128), packed, scale, cb, None, 64, 128).reshape(2, m, 48)
    assert ((y.cpu().float() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 20, 64)])  # decode path and GEMM path (m > 16)
def test_linear_codebook_gradients(shape, device):
    packed, scale, cb, _ = _weight(12, 64, 16, True, device)
    w = ops.dequantize_codebook(packed, scale, cb, group_size=16, k=64)
    x = torch.randn(shape, device=device, requires_grad=True)
    bias = torch.randn(12, device=device, requires_grad=True)
    g = torch.randn(shape[:-1] + (12,), device=device)
    ops.linear_codebook(x, packed, scale, cb, bias, group_size=16, k=64).backward(g)
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    F.linear(x2, w, b2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-5, atol=1e-5)


def test_linear_codebook_compiles_fullgraph():
    packed, scale, cb, _ = _weight(32, 64, 32, True)

    def f(x):
        return torch.relu(ops.linear_codebook(x, packed, scale, cb, None, group_size=32, k=64)) * 2

    x = torch.randn(3, 64)
    assert torch.allclose(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


# ---------------------------------------------------------------- bad input, the same on every device and on meta

def _bad_calls(device):
    packed, scale, cb, _ = _weight(8, 32, 16, False, device)
    x = torch.randn(3, 32, device=device)
    V, T = ValueError, TypeError
    yield "packed dtype", "dequantize_codebook", (packed.int(), scale, cb, 16, 32, torch.float32), T, "packed must be uint8"
    yield "row bytes", "dequantize_codebook", (packed, scale, cb, 16, 40, torch.float32), V, "packed rows hold 16 bytes"
    yield "scale shape", "dequantize_codebook", (packed, scale[:, :1], cb, 16, 32, torch.float32), V, \
        r"scale has shape \[8, 1\]; expected \[8, 2\]"
    yield "codebook shape", "dequantize_codebook", (packed, scale, cb[:8], 16, 32, torch.float32), V, \
        r"codebook has shape \[8\]; expected \[16\] \(one for the tensor\) or \[8, 16\] \(one per row\)"
    yield "codebook dtype", "dequantize_codebook", (packed, scale, cb.int(), 16, 32, torch.float32), T, \
        "codebook must be a floating tensor"
    yield "out dtype", "dequantize_codebook", (packed, scale, cb, 16, 32, torch.int32), T, "output dtype must be"
    yield "x dim", "linear_codebook", (torch.randn(3, 31, device=device), packed, scale, cb, None, 16, 32), V, \
        "x must have last dimension k=32"
    yield "packed 2-D", "linear_codebook", (x, packed.reshape(2, 4, 16), scale.reshape(2, 4, 2), cb, None, 16, 32), \
        V, "packed weight must be 2-D"
    yield "bias", "linear_codebook", (x, packed, scale, cb, torch.zeros(7, device=device), 16, 32), V, \
        r"bias must have shape \[8\]"
    yield "x dtype", "linear_codebook", (x.int(), packed, scale, cb, None, 16, 32), T, "input must be float32"
    yield "per-row codebook of a linear", "linear_codebook", (x, packed, scale, cb.expand(7, 16), None, 16, 32), V, \
        r"expected \[16\] \(one for the tensor\) or \[8, 16\]"


@pytest.mark.parametrize("case", list(_bad_calls("cpu")), ids=lambda c: c[0])
def test_bad_arguments_are_named_by_kernel_and_fake_kernel(case, device):
    name = case[0]
    _, op, args, exc, msg = next(c for c in _bad_calls(device) if c[0] == name)
    fn = getattr(torch.ops.alphaquant, op)
    with pytest.raises(exc, match=msg):
        fn(*args)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(exc, match=msg):
        fn(*meta)


@pytest.mark.parametrize("bad", [NAN, 0.0, -1.0, INF])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_bad_scales_are_rejected_unless_not_validating(bad, m, device):
    packed, scale, cb, _ = _weight(8, 32, 16, True, device)
    scale = scale.clone()
    scale[3, 1] = bad
    with pytest.raises(ValueError, match="dequantize_codebook: scale must be finite and > 0"):
        ops.dequantize_codebook(packed, scale, cb, group_size=16, k=32)
    x = torch.randn(m, 32, device=device)
    with pytest.raises(ValueError, match="alphaquant.(linear|dequantize)_codebook: scale must be finite and > 0"):
        ops.linear_codebook(x, packed, scale, cb, None, group_size=16, k=32)
    assert ops.linear_codebook(x, packed, scale, cb, None, group_size=16, k=32, validate=False).shape == (m, 8)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_non_finite_codebook_values_are_rejected(bad, per_row, m, device):
    packed, scale, cb, _ = _weight(8, 32, 16, per_row, device)
    cb = cb.clone()
    cb.view(-1)[-1] = bad  # even a value no code uses
    with pytest.raises(ValueError, match="dequantize_codebook: codebook values must be finite"):
        ops.dequantize_codebook(packed, scale, cb, group_size=16, k=32)
    x = torch.randn(m, 32, device=device)
    with pytest.raises(ValueError, match="alphaquant.(linear|dequantize)_codebook: codebook values must be finite"):
        ops.linear_codebook(x, packed, scale, cb, None, group_size=16, k=32)
    ops.dequantize_codebook(packed, scale, cb, group_size=16, k=32, validate=False)


def test_fake_kernels_give_exact_shapes():
    m = torch.device("meta")
    packed = torch.empty(5, 21, dtype=torch.uint8, device=m)
    y = ops.dequantize_codebook(packed, torch.empty(5, 3, device=m), torch.empty(5, 16, device=m), group_size=16,
                                k=41, dtype=torch.bfloat16)
    assert y.shape == (5, 41) and y.dtype == torch.bfloat16
    x = torch.empty(2, 7, 41, device=m)
    y = ops.linear_codebook(x, packed, torch.empty(1, 1, device=m), torch.empty(16, device=m), None, group_size=-1,
                            k=41)
    assert y.shape == (2, 7, 5)


# ---------------------------------------------------------------- the k-means fit

def test_lloyd_recovers_well_separated_levels():
    levels = torch.tensor(NF4_VALUES) + torch.linspace(-0.02, 0.02, 16)  # near the starting values
    levels[0], levels[-1] = -1.0, 1.0
    u = levels[torch.randint(0, 16, (1, 5000), generator=torch.Generator().manual_seed(0))]
    c = fit_codebook(u, torch.ones_like(u), iterations=10)
    present = torch.unique(u)
    assert torch.allclose(c[0], present, atol=1e-6)  # every level is a centroid: zero error


def test_lloyd_never_increases_the_weighted_error():
    g = torch.Generator().manual_seed(1)
    u = (torch.randn(3, 4000, generator=g) * 0.4).clamp(-1, 1)
    w = torch.rand(3, 4000, generator=g)

    def err(c):
        return (w * (u - torch.gather(c, 1, nearest_codes(u, c))) ** 2).sum(1)

    prev = err(fit_codebook(u, w, 0))
    for it in (1, 2, 4, 8, 16):
        cur = err(fit_codebook(u, w, it))
        assert (cur <= prev * (1 + 1e-6)).all()
        prev = cur
    assert (prev < err(fit_codebook(u, w, 0)) * 0.95).all()  # and the fit does help


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), seed=st.integers(0, 2**31 - 1), per_row=st.booleans())
def test_nearest_codes_are_nearest(n, seed, per_row):
    g = torch.Generator().manual_seed(seed)
    rows = 3 if per_row else 1
    cb = (torch.rand(rows, 16, generator=g) * 2 - 1).sort(-1).values
    u = torch.rand(rows, n, generator=g) * 2.2 - 1.1
    codes = nearest_codes(u, cb if per_row else cb[0])
    d = (u.double()[..., None] - cb.double()[:, None, :]).abs()
    assert (d.gather(-1, codes[..., None]).squeeze(-1) <= d.min(-1).values + 1e-7).all()


# ---------------------------------------------------------------- the quantizer

def _w(n=96, k=256, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _err(p, w, importance=None):
    d = (p.dequantize(torch.float32) - w) ** 2
    return (d if importance is None else d * importance).sum().item()


@pytest.mark.parametrize("cb_gran", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("gran", ["per_group", "per_channel", "per_tensor"])
def test_quantizer_layout_and_storage(cb_gran, gran):
    cfg = CodebookConfig(group_size=64, granularity=gran, codebook_granularity=cb_gran, dtype="float32")
    w = _w(48, 200)
    p = CodebookQuantizer(cfg).quantize_weight(w)
    assert p.fmt == "lut4" and p.zero_point is None and p.data.shape == (48, 100)
    assert p.codebook.dtype == torch.float16
    assert p.codebook.shape == ((48, 16) if cb_gran == "per_channel" else (16,))
    assert p.nbytes == p.data.numel() + p.scale.numel() * 4 + p.codebook.numel() * 2
    # dequantize is table[code] * scale, with the groups' max|x| as scales (nf4's rule)
    assert torch.equal(p.scale, NF4Quantizer(NF4Config(group_size=64, granularity=gran)).quantize_weight(w).scale)
    assert torch.equal(p.dequantize(), ref.dequantize_codebook(p.data, p.scale, p.codebook, p.group_size, 200))
    # the stored code book is sorted and every code is the nearest stored value
    assert (p.codebook[..., 1:] >= p.codebook[..., :-1]).all()
    u = w / ref._expand(p.scale, w.shape, p.group_size)
    table = p.codebook.float()
    codes = ops.unpack(p.data, 4, 200).long()
    vals = table[codes] if table.dim() == 1 else torch.gather(table, 1, codes)
    best = (u[..., None] - (table if table.dim() == 2 else table.expand(48, 16))[:, None, :]).abs().min(-1).values
    assert ((u - vals).abs() <= best + 1e-6).all()


@pytest.mark.parametrize("cb_gran", ["per_tensor", "per_channel"])
def test_fit_beats_nf4(cb_gran):
    # Lloyd's starts from the NF4 table with NF4's scales and assignment: it can only get better
    w = _w() ** 3  # heavy tails: far from the normal distribution NF4 is built for
    cfg = CodebookConfig(group_size=64, codebook_granularity=cb_gran, codebook_dtype="float32", dtype="float32")
    lut = _err(CodebookQuantizer(cfg).quantize_weight(w), w)
    nf4 = _err(NF4Quantizer(NF4Config(group_size=64, dtype="float32")).quantize_weight(w), w)
    assert lut < nf4 * 0.9
    fp16 = _err(CodebookQuantizer(CodebookConfig(group_size=64, codebook_granularity=cb_gran,
                                                 dtype="float32")).quantize_weight(w), w)
    assert fp16 < nf4 * 0.9  # a float16 code book keeps the gain


def test_per_channel_code_books_fit_better_than_one():
    w = _w() * torch.linspace(0.2, 3, 96)[:, None] ** torch.linspace(0, 2, 96)[:, None]
    w = torch.sign(w) * w.abs() ** torch.linspace(0.5, 2.5, 96)[:, None]  # a different shape in every row
    errs = {g: _err(CodebookQuantizer(CodebookConfig(codebook_granularity=g, dtype="float32")).quantize_weight(w), w)
            for g in ("per_tensor", "per_channel")}
    assert errs["per_channel"] < errs["per_tensor"]


def test_importance_weights_the_fit():
    w = _w()
    imp = torch.ones(256)
    imp[:32] = 100.0  # a few very sensitive input features (a diagonal Hessian broadcast over rows)
    q = CodebookQuantizer(CodebookConfig(dtype="float32", codebook_dtype="float32"))
    plain, weighted = q.quantize_weight(w), q.quantize_weight(w, importance=imp)
    assert _err(weighted, w, imp) < _err(plain, w, imp)
    assert _err(weighted, w) > _err(plain, w)  # it trades unweighted error for the weighted one
    assert torch.equal(q.quantize_weight(w, importance=torch.ones(96, 256)).codebook, plain.codebook)


def test_quantizer_input_checks():
    q = CodebookQuantizer(CodebookConfig())
    with pytest.raises(ValueError, match="NaN or Inf"):
        q.quantize_weight(torch.tensor([[1.0, NAN]]))
    with pytest.raises(ValueError, match="does not broadcast"):
        q.quantize_weight(_w(), importance=torch.ones(3))
    with pytest.raises(ValueError, match="finite and >= 0"):
        q.quantize_weight(_w(), importance=-torch.ones(256))
    with pytest.raises(TypeError, match="weights only"):
        q.quantize_activation(torch.randn(2, 8))
    with pytest.raises(TypeError, match="floating"):
        q.quantize_weight(torch.ones(2, 8, dtype=torch.int32))


@pytest.mark.parametrize("kwargs,match", [({"codebook_granularity": "per_group"}, "codebook_granularity"),
                                          ({"codebook_dtype": "bfloat16"}, "codebook_dtype"),
                                          ({"iterations": -1}, "iterations"), ({"stochastic": True}, "stochastic"),
                                          ({"clip_search": True}, "clip_search"), ({"zero_opt": True}, "zero_opt"),
                                          ({"group_size": 0}, "group_size")])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=f"CodebookConfig.{match}"):
        CodebookConfig(**kwargs)


def test_half_scales_are_what_is_computed_with():
    w = _w()
    p = CodebookQuantizer(CodebookConfig(scale_dtype="float16", dtype="float32")).quantize_weight(w)
    assert p.scale.dtype == torch.float16
    assert p.bits_per_value == 4 + 16 / 64 + 8 * 16 * 2 / w.numel()
    assert torch.equal(p.dequantize(), ref.dequantize_codebook(p.data, p.scale.float(), p.codebook, 64, 256))


def test_packed_tensor_rules_and_device_moves():
    p = CodebookQuantizer(CodebookConfig()).quantize_weight(_w(8, 64))
    with pytest.raises(ValueError, match="needs a floating codebook"):
        PackedTensor(p.data, p.scale, None, "lut4", True, 64, (8, 64))
    with pytest.raises(ValueError, match="only for learned code book formats"):
        PackedTensor(p.data, p.scale, None, "nf4", True, 64, (8, 64), codebook=p.codebook)
    moved = p.to("cpu")
    assert torch.equal(moved.codebook, p.codebook) and torch.equal(moved.dequantize(), p.dequantize())


# ---------------------------------------------------------------- QuantLinear, plans, checkpoints

def test_registry():
    (WQ, WCfg), _ = create_quantizer_from_scheme({"wq": "lut4", "aq": "none"}, "float16")
    assert WQ is CodebookQuantizer and issubclass(WCfg, CodebookConfig) and WCfg().dtype == "float16"


@pytest.mark.parametrize("cb_gran", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("m", [1, 20])
def test_quant_linear_uses_the_code_book(cb_gran, m, device):
    from alphaquant.nn import QuantLinear

    torch.manual_seed(0)
    lin = nn.Linear(128, 40).to(device)
    q = QuantLinear.from_linear(lin, CodebookQuantizer(CodebookConfig(codebook_granularity=cb_gran, dtype="float32")))
    assert q.weight_codebook.shape == ((40, 16) if cb_gran == "per_channel" else (16,))
    assert set(q.state_dict()) == {"weight_packed", "weight_scale", "weight_codebook", "bias"}
    x = torch.randn(m, 128, device=device)
    want = F.linear(x, q.dequantized_weight(torch.float32), q.bias)
    assert torch.allclose(q(x), want, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), q(x))
    bad = q.state_dict()
    bad["weight_codebook"] = bad["weight_codebook"].clone()
    bad["weight_codebook"].view(-1)[0] = NAN
    with pytest.raises(ValueError, match="non-finite code book value"):
        q.load_state_dict(bad)


def test_activations_cannot_use_a_code_book():
    from alphaquant.nn import QuantLinear
    from alphaquant.plans import apply_plan

    with pytest.raises(ValueError, match="cannot quantize activations"):
        QuantLinear(8, 4, False, "int8", True, 0, act_quantizer=CodebookQuantizer(CodebookConfig()))
    model = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(ValueError, match="cannot quantize activations"):
        apply_plan(model, {"default": {"wq": "int4", "aq": "lut4"}})
    assert isinstance(model[0], nn.Linear)  # put back


@pytest.mark.parametrize("cb_gran,cb_dtype", [("per_tensor", "float16"), ("per_channel", "float32")])
def test_checkpoint_round_trip(cb_gran, cb_dtype, tmp_path, monkeypatch):
    from alphaquant.checkpoint_file import load_quantized, read_metadata, save_quantized
    from alphaquant.plans import apply_plan
    from alphaquant.quantizers import registry

    # plans name the scheme; the code book layout comes from the registered config defaults
    monkeypatch.setitem(registry.QUANTIZER_REGISTRY, "lut4_test",
                        (CodebookQuantizer, CodebookConfig, {"codebook_granularity": cb_gran,
                                                             "codebook_dtype": cb_dtype}))
    plan = {"default": {"wq": "lut4_test", "aq": "none", "group_size": 32, "dtype": "float32"},
            "overrides": [{"pattern": "2", "wq": "lut4"}]}

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, 8))

    m = model()
    report = apply_plan(m, plan)
    assert report.layers[0].bits_per_weight == 8.0 * m[0].packed_weight.nbytes / (40 * 96)
    path = str(tmp_path / "m.safetensors")
    save_quantized(m, path, plan)
    layers = read_metadata(path)["layers"]
    assert layers["0"]["codebook_shape"] == ([40, 16] if cb_gran == "per_channel" else [16])
    assert layers["0"]["codebook_dtype"] == cb_dtype and layers["2"]["codebook_shape"] == [16]
    fresh = model()
    # the code book layout is read from the checkpoint, whatever the registered defaults are now
    monkeypatch.setitem(registry.QUANTIZER_REGISTRY, "lut4_test", (CodebookQuantizer, CodebookConfig, {}))
    load_quantized(fresh, path)
    x = torch.randn(5, 96)
    assert torch.equal(fresh(x), m(x))
    assert torch.equal(fresh[0].weight_codebook, m[0].weight_codebook)


def test_checkpoint_with_non_finite_code_book_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from alphaquant.checkpoint_file import load_quantized, save_quantized
    from alphaquant.plans import apply_plan

    plan = {"default": {"wq": "lut4", "aq": "none", "group_size": 32, "dtype": "float32"}}
    m = nn.Sequential(nn.Linear(64, 8))
    apply_plan(m, plan)
    path = str(tmp_path / "m.safetensors")
    save_quantized(m, path, plan)
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
    state = load_file(path)
    state["0.weight_codebook"][3] = INF
    save_file(state, path, metadata=meta)
    with pytest.raises(ValueError, match="0.weight_codebook holds non-finite values"):
        load_quantized(nn.Sequential(nn.Linear(64, 8)), path)
