"""GPTQ against a direct least-squares reference, and its layer error against round-to-nearest."""
import pytest
import torch

from alphaquant import ops
from alphaquant.algorithms.gptq import GPTQOptions, HessianAccumulator, gptq_quantize, layer_output_error
from alphaquant.layout import PER_CHANNEL
from alphaquant.quantizers import FP4Config, FP4Quantizer, FP8Config, FP8Quantizer, INT4Config, INT4Quantizer
from alphaquant.quantizers.registry import lookup


def correlated_inputs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5 + torch.eye(k, dtype=torch.float64)
    return torch.randn(n, k, generator=g, dtype=torch.float64) @ mix


def reference_lstsq(w, x, quantizer, order, group_len=None):
    """Quantize columns in ``order`` one at a time; after each, re-solve every column not yet
    quantized by least squares so that x @ w.T is matched as well as possible. Scales: per
    channel from the original weight, or (group_len) chosen at the start of each group from the
    current weights, as GPTQ does without act_order."""
    w = w.to(torch.float64)
    target = x @ w.T
    cur = w.clone()
    q = torch.zeros_like(w)
    done = []
    scale = zero = None
    if group_len is None:
        scale, zero = quantizer.choose_weight_scales(w.float(), group_size=PER_CHANNEL)
    for j in order:
        if group_len is not None and j % group_len == 0:
            scale, zero = quantizer.choose_weight_scales(cur[:, j:j + group_len].float(), group_size=PER_CHANNEL)
        q[:, j] = ops.fake_quantize(cur[:, j:j + 1].float(), quantizer.fmt, symmetric=quantizer.symmetric,
                                    group_size=1, scale=scale, zero_point=zero).squeeze(1).double()
        done.append(j)
        rest = [c for c in order if c not in done]
        if rest:
            resid = target - x[:, done] @ q[:, done].T
            cur[:, rest] = torch.linalg.lstsq(x[:, rest], resid).solution.T
    return q


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [1, 3, 128])
def test_gptq_matches_least_squares_per_channel(symmetric, act_order, block_size):
    torch.manual_seed(1)
    rows, k = 6, 11
    x = correlated_inputs(200, k)
    w = torch.randn(rows, k, dtype=torch.float64)
    quantizer = INT4Quantizer(INT4Config(symmetric=symmetric, granularity="per_channel", dtype="float32"))
    acc = HessianAccumulator(k)
    acc.add(x)
    h = acc.hessian()
    packed = gptq_quantize(w.float(), h, quantizer, GPTQOptions(damp=0.0, block_size=block_size, act_order=act_order))
    order = torch.argsort(torch.diagonal(h), descending=True).tolist() if act_order else list(range(k))
    expected = reference_lstsq(w.float().double(), x, quantizer, order)
    torch.testing.assert_close(packed.dequantize(torch.float32).double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("block_size", [2, 4, 128])
def test_gptq_matches_least_squares_per_group(block_size):
    torch.manual_seed(2)
    rows, k, g = 5, 10, 4  # a short last group of 2
    x = correlated_inputs(300, k, seed=3)
    w = torch.randn(rows, k, dtype=torch.float64)
    quantizer = INT4Quantizer(INT4Config(symmetric=False, group_size=g, dtype="float32"))
    acc = HessianAccumulator(k)
    acc.add(x)
    packed = gptq_quantize(w.float(), acc.hessian(), quantizer, GPTQOptions(damp=0.0, block_size=block_size))
    expected = reference_lstsq(w.float().double(), x, quantizer, list(range(k)), group_len=g)
    torch.testing.assert_close(packed.dequantize(torch.float32).double(), expected, rtol=0, atol=1e-5)


FORMATS = [("int2", False), ("int3", False), ("int4", True), ("int4", False), ("int6", True), ("int8", True),
           ("fp8", True), ("fp8_e5m2", True), ("fp4", True), ("nf4", True), ("lut4", True)]


@pytest.mark.parametrize("name,symmetric", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest(name, symmetric, act_order):
    torch.manual_seed(0)
    rows, k = 33, 70  # odd rows, k not a multiple of the group
    x = correlated_inputs(400, k, seed=5).float()
    w = torch.randn(rows, k)
    q_cls, cfg = lookup(name)
    kwargs = {"symmetric": symmetric} if name.startswith("int") else {}
    quantizer = q_cls(cfg(group_size=16, dtype="float32", **kwargs))
    acc = HessianAccumulator(k)
    acc.add(x)
    h = acc.hessian()
    rtn = quantizer.quantize_weight(w).dequantize(torch.float32)
    packed = gptq_quantize(w, h, quantizer, GPTQOptions(act_order=act_order))
    assert packed.data.dtype == torch.uint8 and packed.fmt == quantizer.fmt
    assert tuple(packed.scale.shape) == tuple(quantizer.quantize_weight(w).scale.shape)
    deq = packed.dequantize(torch.float32)
    # the codes are on the format's grid: packing the dequantized weight again gives the same bytes
    again = quantizer.pack_values(deq, packed.scale, packed.codebook) if name == "lut4" else \
        quantizer.pack_with_scales(deq, packed.scale, packed.zero_point)
    assert torch.equal(again.data, packed.data)
    assert layer_output_error(w, deq, h) < 0.9 * layer_output_error(w, rtn, h)


def test_gptq_fp16_scales_and_zero_opt():
    torch.manual_seed(4)
    x = correlated_inputs(300, 64, seed=6).float()
    w = torch.randn(16, 64)
    quantizer = INT4Quantizer(INT4Config(symmetric=False, group_size=32, zero_opt=True, scale_dtype="float16",
                                         dtype="float32"))
    acc = HessianAccumulator(64)
    acc.add(x)
    packed = gptq_quantize(w, acc.hessian(), quantizer)
    assert packed.scale.dtype == torch.float16 and packed.zero_point.dtype == torch.float16
    rtn = quantizer.quantize_weight(w).dequantize(torch.float32)
    h = acc.hessian()
    assert layer_output_error(w, packed.dequantize(torch.float32), h) < layer_output_error(w, rtn, h)


def test_gptq_per_tensor_fp8_and_dead_inputs():
    x = correlated_inputs(100, 12).float()
    x[:, 3] = 0  # an input that is never active
    w = torch.randn(4, 12)
    quantizer = FP8Quantizer(FP8Config(granularity="per_tensor", dtype="float32"))
    acc = HessianAccumulator(12)
    acc.add(x)
    packed = gptq_quantize(w, acc.hessian(), quantizer)
    assert packed.scale.shape == (1, 1)
    assert torch.all(packed.dequantize(torch.float32)[:, 3] == 0)


def test_gptq_bad_input():
    quantizer = FP4Quantizer(FP4Config(dtype="float32"))
    with pytest.raises(ValueError, match="does not fit"):
        gptq_quantize(torch.randn(4, 8), torch.eye(7), quantizer)
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantize(torch.randn(4), torch.eye(4), quantizer)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_quantize(torch.full((2, 3), float("nan")), torch.eye(3), quantizer)
    with pytest.raises(ValueError, match="no calibration input"):
        HessianAccumulator(3).hessian()
    with pytest.raises(ValueError, match="damp"):
        GPTQOptions(damp=2.0)
    with pytest.raises(ValueError, match="block_size"):
        GPTQOptions(block_size=0)


@pytest.mark.parametrize("name,symmetric", [("int4", False), ("int3", True), ("fp4", True), ("int2", False)])
def test_refit_keeps_the_codes_and_lowers_the_layer_error(name, symmetric):
    torch.manual_seed(7)
    x = correlated_inputs(500, 48, seed=8).float()
    w = torch.randn(20, 48)
    q_cls, cfg = lookup(name)
    kwargs = {"symmetric": symmetric} if name.startswith("int") else {}
    quantizer = q_cls(cfg(group_size=16, dtype="float32", scale_dtype="float16", **kwargs))
    acc = HessianAccumulator(48)
    acc.add(x)
    h = acc.hessian()
    plain = gptq_quantize(w, h, quantizer, GPTQOptions())
    refit = gptq_quantize(w, h, quantizer, GPTQOptions(refit=True))
    assert torch.equal(ops.unpack(plain.data, plain.bits, 48), ops.unpack(refit.data, refit.bits, 48))
    assert refit.scale.dtype == torch.float16
    e_plain = layer_output_error(w, plain.dequantize(torch.float32), h)
    assert layer_output_error(w, refit.dequantize(torch.float32), h) < e_plain


@pytest.mark.parametrize("cfg,options", [
    (dict(symmetric=False, group_size=32, zero_opt=True, scale_dtype="float16"), dict(refit=True)),
    (dict(symmetric=False, group_size=32, zero_opt=True, zero_point="byte", scale_dtype="float16"), dict()),
    (dict(symmetric=True, granularity="per_channel"), dict(act_order=True)),
    (dict(symmetric=False, group_size=48, zero_point="integer", zero_opt=True), dict(act_order=True, refit=True))])
def test_gptq_in_blocks_of_rows_gives_the_codes_of_the_whole_weight(monkeypatch, cfg, options):
    import alphaquant.algorithms.gptq as gptq_mod

    g = torch.Generator().manual_seed(4)
    rows, k = 5000, 128  # zero_opt refines blocks of 1024 rows, the column loop 2048: blocks of 2048
    w = torch.randn(rows, k, generator=g) * 0.05
    acc = HessianAccumulator(k)
    acc.add(correlated_inputs(400, k, seed=5))
    quantizer = INT4Quantizer(INT4Config(dtype="float32", **cfg))
    whole = gptq_quantize(w, acc.hessian(), quantizer, GPTQOptions(**options))
    monkeypatch.setattr(gptq_mod, "ROW_BLOCK_BYTES", 1)
    assert gptq_mod._rows_per_block(quantizer, k) == 2048
    blocks = gptq_quantize(w, acc.hessian(), quantizer, GPTQOptions(**options))
    assert blocks.shape == whole.shape == (rows, k)
    for a, b in ((whole.data, blocks.data), (whole.scale, blocks.scale), (whole.zero_point, blocks.zero_point)):
        assert (a is None and b is None) or torch.equal(a, b)
