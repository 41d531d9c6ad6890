"""Quantized embeddings: the gather ops against the reference, QuantEmbedding, plans that select
embeddings, LM heads tied to a quantized table, and checkpoints that store the table once."""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from alphaquant import ops, reference
from alphaquant.nn import QuantEmbedding, QuantLinear, TiedQuantLinear
from alphaquant.plans import PlanError, apply_plan
from conftest import DEVICES

transformers = pytest.importorskip("transformers")

FORMATS = [("int2", True), ("int3", False), ("int4", True), ("int4", False), ("int6", False), ("int8", True),
           ("fp8_e4m3", True), ("fp8_e5m2", True), ("fp6_e3m2", True), ("fp6_e2m3", True), ("fp4_e2m1", True),
           ("nf4", True)]


def table(rows, k, fmt, symmetric, group_size, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g).to(device)
    return ops.quantize(w, fmt, symmetric=symmetric, group_size=group_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt,symmetric", FORMATS)
@pytest.mark.parametrize("group_size", [16, 0, -1, 7])
def test_embedding_is_bit_exact_with_the_reference(device, fmt, symmetric, group_size):
    rows, k = 37, 45  # odd sizes; group 16 and 7 leave a short last group
    packed, scale, zero = table(rows, k, fmt, symmetric, group_size, device)
    zero = zero if zero.numel() else None
    idx = torch.tensor([[0, 36, 5], [5, 5, 17]], device=device)
    for dtype in (torch.float32, torch.bfloat16):
        out = ops.embedding(idx, packed, scale, zero, fmt, symmetric=symmetric, group_size=group_size, k=k,
                            dtype=dtype)
        ref = reference.embedding(idx, packed, scale, zero, fmt, symmetric, group_size, k, dtype)
        assert out.shape == (2, 3, k) and out.dtype == dtype and out.device.type == device
        assert torch.equal(out.cpu(), ref)
    # the rows of the full decode, exactly
    full = ops.dequantize(packed, scale, zero, fmt, symmetric=symmetric, group_size=group_size, k=k)
    assert torch.equal(ops.embedding(idx, packed, scale, zero, fmt, symmetric=symmetric, group_size=group_size,
                                     k=k), full[idx])


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), k=st.integers(1, 70), group=st.sampled_from([1, 8, 13, 32, 0, -1]),
       fmt=st.sampled_from(FORMATS), shape=st.lists(st.integers(0, 4), max_size=3), seed=st.integers(0, 99),
       int32=st.booleans(), strided=st.booleans())
def test_embedding_matches_the_reference_on_random_shapes(rows, k, group, fmt, shape, seed, int32, strided):
    packed, scale, zero = table(rows, k, fmt[0], fmt[1], group, seed=seed)
    zero = zero if zero.numel() else None
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, rows, tuple(shape) + ((2,) if strided else ()), generator=g)
    if strided:
        idx = idx[..., 0]  # not contiguous
    idx = idx.int() if int32 else idx
    out = ops.embedding(idx, packed, scale, zero, fmt[0], symmetric=fmt[1], group_size=group, k=k)
    assert out.shape == tuple(idx.shape) + (k,)
    assert torch.equal(out, reference.embedding(idx, packed, scale, zero, fmt[0], fmt[1], group, k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_row", [False, True])
def test_embedding_codebook_matches_the_reference(device, per_row):
    rows, k = 21, 35
    packed, scale, _ = table(rows, k, "nf4", True, 8, device)
    cb = (torch.randn(rows, 16) if per_row else torch.randn(16)).sort(-1).values.half().to(device)
    idx = torch.tensor([3, 20, 0, 3], device=device)
    out = ops.embedding_codebook(idx, packed, scale, cb, group_size=8, k=k)
    assert torch.equal(out.cpu(), reference.embedding_codebook(idx, packed, scale, cb, 8, k))


def test_bad_indices_and_tables_are_refused_clearly():
    packed, scale, zero = table(10, 16, "int4", False, 8)
    args = dict(symmetric=False, group_size=8, k=16)
    with pytest.raises(TypeError, match="indices must be int64 or int32; got (torch.float32|Float)"):
        ops.embedding(torch.zeros(3), packed, scale, zero, "int4", **args)
    with pytest.raises(IndexError, match=r"indices must be in \[0, 10\) for a table of 10 rows; got values from 0 to 10"):
        ops.embedding(torch.tensor([0, 10]), packed, scale, zero, "int4", **args)
    with pytest.raises(IndexError, match="got values from -1 to 2"):
        ops.embedding(torch.tensor([2, -1]), packed, scale, zero, "int4", **args)
    with pytest.raises(ValueError, match="the packed table must be 2-D"):
        ops.embedding(torch.tensor([0]), packed[0], scale[0], zero[0], "int4", **args)
    with pytest.raises(ValueError, match="scale"):
        ops.embedding(torch.tensor([0]), packed, scale[:, :1], zero, "int4", **args)
    with pytest.raises(ValueError, match="unknown format|format"):
        ops.embedding(torch.tensor([0]), packed, scale, zero, "int44", **args)
    bad = scale.clone()
    bad[4, 1] = float("nan")
    ops.embedding(torch.tensor([3]), packed, bad, zero, "int4", **args)  # the bad row is not read
    with pytest.raises(ValueError, match="scale"):
        ops.embedding(torch.tensor([4]), packed, bad, zero, "int4", **args)
    empty = ops.embedding(torch.zeros(0, 3, dtype=torch.long), packed, scale, zero, "int4", **args)
    assert empty.shape == (0, 3, 16)


def test_quant_embedding_holds_only_packed_bytes_and_compiles():
    emb = torch.nn.Embedding(50, 24, padding_idx=1)
    from alphaquant.quantizers import INT4Config, INT4Quantizer

    wq = INT4Quantizer(INT4Config(group_size=8, symmetric=False))
    q = QuantEmbedding.from_embedding(emb, wq)
    assert all(not v.is_floating_point() or v.numel() <= 50 * 3 for v in q.state_dict().values())
    assert q.weight_packed.dtype == torch.uint8 and q.weight_packed.shape == (50, 12)
    idx = torch.tensor([[1, 49, 7]])
    assert torch.equal(q(idx), q.dequantized_weight()[idx])
    assert torch.equal(torch.compile(q, fullgraph=True)(idx), q(idx))
    q.weight_scale[0, 0] = 0.0
    with pytest.raises(ValueError, match=r"QuantEmbedding\(50 x 24\): weight scales must be finite"):
        q.load_state_dict(q.state_dict())


def tiny_lm(tied=True):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


EMB_PLAN = {"default": {"wq": "int4", "symmetric": False, "group_size": 32, "dtype": "float32",
                        "scale_dtype": "float16"},
            "overrides": [{"pattern": "model.embed_tokens", "group_size": 16}]}


def test_a_plan_quantizes_the_embedding_and_the_tied_head_shares_its_table(tmp_path):
    from alphaquant.checkpoint_file import load_quantized, read_header, save_quantized

    model = tiny_lm(tied=True)
    ids = torch.randint(0, 96, (2, 9))
    report = apply_plan(model, EMB_PLAN)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, TiedQuantLinear) and head.embedding is emb
    assert report.layers[0].name == "model.embed_tokens" and report.layers[0].scheme == "embedding wint4a/g16"
    assert "lm_head" not in report.skipped and "lm_head" not in [r.name for r in report.layers]
    with torch.no_grad():
        table = emb.dequantized_weight()
        assert torch.allclose(head(torch.eye(64)), table.T, atol=1e-5)
        logits = model(ids).logits
    state = model.state_dict()
    assert not any(k.startswith("lm_head.weight") for k in state)
    assert not any(v.is_floating_point() and v.numel() >= 96 * 64 for v in state.values())  # no float table
    path = str(tmp_path / "m.safetensors")
    save_quantized(model, path, EMB_PLAN)
    tensors, _ = read_header(path)
    assert sum(1 for k in tensors if k.endswith("weight_packed") and tensors[k][1][0] == 96) == 1
    fresh = load_quantized(tiny_lm(tied=True), path)
    assert isinstance(fresh.lm_head, TiedQuantLinear) and fresh.lm_head.embedding is fresh.model.embed_tokens
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, logits)
    import copy

    moved = copy.deepcopy(model).to(torch.float32)
    assert moved.lm_head.embedding is moved.model.embed_tokens  # the tie survives copies


def test_embeddings_are_quantized_only_when_an_override_names_them():
    model = tiny_lm()
    apply_plan(model, {"default": {"wq": "int8"}, "overrides": [{"pattern": "*", "group_size": 32}]})
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    assert isinstance(model.lm_head, QuantLinear)  # today's behaviour: the head gets codes of its own
    model = tiny_lm(tied=False)
    apply_plan(model, {"default": {"wq": "int8"}, "overrides": [{"pattern": "*embed*", "wq": "int4"}]})
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and model.model.embed_tokens.fmt == "int4"
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.fmt == "int8"  # untied: its own codes
    model = tiny_lm()
    apply_plan(model, {"default": {"wq": "int8"}, "overrides": [{"pattern": "model.embed_tokens", "wq": "none"}]})
    assert type(model.model.embed_tokens) is torch.nn.Embedding


def test_a_failing_plan_restores_the_embedding_and_the_head():
    model = tiny_lm()
    emb, head = model.model.embed_tokens, model.lm_head
    with pytest.raises(PlanError):
        apply_plan(model, {**EMB_PLAN, "default": {**EMB_PLAN["default"], "algorithm": "gptq"}})  # no data
    assert model.model.embed_tokens is emb and model.lm_head is head
    model.model.embed_tokens.weight.data[3, 3] = float("nan")
    with pytest.raises(PlanError, match="model.embed_tokens: the weight holds NaN"):
        apply_plan(model, EMB_PLAN)
    assert model.model.embed_tokens is emb


def test_a_tied_float_head_is_stored_once(tmp_path):
    from alphaquant.checkpoint_file import load_quantized, read_header, save_quantized

    model = tiny_lm(tied=True)
    plan = {"default": {"wq": "int8"}, "overrides": [{"pattern": "lm_head", "skip": True}]}
    apply_plan(model, plan)
    path = str(tmp_path / "m.safetensors")
    save_quantized(model, path, plan)
    tensors, meta = read_header(path)
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors
    fresh = load_quantized(tiny_lm(tied=True), path)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_rotated_plans_untie_the_head_and_quantize_the_embedding():
    model = tiny_lm(tied=True)
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        ref = model(ids).logits
    apply_plan(model, {**EMB_PLAN, "rotation": "hadamard", "default": {**EMB_PLAN["default"], "wq": "int8"},
                       "overrides": [{"pattern": "model.embed_tokens", "wq": "int8", "group_size": 16}]})
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_a_tied_head_with_act_int8(tmp_path):
    from alphaquant import reference as ref
    from alphaquant.checkpoint_file import load_quantized, save_quantized

    plan = {"default": {"wq": "int4", "group_size": 32, "dtype": "float32", "scale_dtype": "float16",
                        "act_int8": True},
            "overrides": [{"pattern": "model.embed_tokens", "act_int8": False}]}
    model = tiny_lm(tied=True)
    apply_plan(model, plan)
    head, emb = model.lm_head, model.model.embed_tokens
    assert isinstance(head, TiedQuantLinear) and head.act_int8 and "act_int8=True" in repr(head)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = head(x)
    p = emb.packed_weight
    want = ref.linear_int8_act(x, p.data, p.scale, p.zero_point, None, "int4", True, 32, 64)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    assert not torch.equal(y, ops.linear(x, p.data, p.scale, None, None, "int4", group_size=32, k=64))
    xg = x.clone().requires_grad_()
    head(xg).sum().backward()  # a gradient: the float-activation path
    assert xg.grad is not None
    with torch.no_grad():
        emb.weight_scale.mul_(2)  # in place: the layout follows
        torch.testing.assert_close(head(x), 2 * y, rtol=1e-4, atol=1e-4)
        ids = torch.randint(0, 96, (1, 7))
        logits = model(ids).logits
    path = str(tmp_path / "m.safetensors")
    save_quantized(model, path, plan)
    fresh = load_quantized(tiny_lm(tied=True), path)
    assert fresh.lm_head.act_int8
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, logits)
    bad = {"default": {**plan["default"]}, "overrides": [{"pattern": "model.embed_tokens", "wq": "nf4", "act_int8": False}]}
    with pytest.raises(PlanError, match="tied to the quantized embedding model.embed_tokens and asks for act_int8"):
        apply_plan(tiny_lm(tied=True), bad)
