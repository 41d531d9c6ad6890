"""Streaming quantization of a GGUF input: one tensor decoded at a time, the same checkpoint as
loading the whole model, damaged files refused before anything is written."""
import json
import os

import pytest
import torch

from alphaquant.plans import apply_plan

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from test_export_gguf import bpe_tokenizer, plan, tiny_llama  # noqa: E402,F401  (fixture reused)


def _gguf(tmp_path, tokenizer, wq, symmetric, tied):
    model = tiny_llama(len(tokenizer), tied=tied)
    apply_plan(model, plan(wq, symmetric))
    path = str(tmp_path / f"m-{wq}-{symmetric}-{tied}.gguf")
    from alphaquant.export.gguf_file import to_gguf

    to_gguf(model, tokenizer, path)
    return path


def _tensors(folder):
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("wq,symmetric,tied", [("int4", False, True), ("int8", True, False)])
def test_a_gguf_input_streams_to_the_in_memory_checkpoint(tmp_path, bpe_tokenizer, wq, symmetric, tied, capsys):
    from alphaquant.cli import main

    src = _gguf(tmp_path, bpe_tokenizer, wq, symmetric, tied)
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"default": {"wq": "int4", "symmetric": False, "group_size": 32, "zero_opt": True,
                                         "scale_dtype": "float16"},
                             "overrides": [{"pattern": "model.embed_tokens", "group_size": 64}]}))
    assert main(["quantize", src, "--plan", str(p), "--out", str(tmp_path / "s"), "--no-eval"]) == 0
    assert "streamed" in capsys.readouterr().out
    assert main(["quantize", src, "--plan", str(p), "--out", str(tmp_path / "m"), "--no-eval", "--in-memory"]) == 0
    streamed, in_memory = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert streamed.keys() == in_memory.keys()
    for k in streamed:
        assert streamed[k].dtype == in_memory[k].dtype and torch.equal(streamed[k], in_memory[k]), k
    assert os.path.isfile(tmp_path / "s" / "tokenizer.json")  # the tokenizer of the GGUF metadata


def test_gguf_source_names_and_decodes_like_transformers(tmp_path, bpe_tokenizer):
    from alphaquant.streaming import meta_model, open_source

    src = _gguf(tmp_path, bpe_tokenizer, "int4", False, False)
    config, model = meta_model(src)
    source = open_source(src, config)
    try:
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=os.path.basename(src),
                                                                dtype=torch.float32).state_dict()
        assert set(source.tensors) == set(model.state_dict()) == set(ref)
        for k in source.tensors:
            assert torch.equal(source.get(k).float(), ref[k]), k
    finally:
        source.close()


def test_a_damaged_gguf_input_is_refused_and_nothing_is_written(tmp_path, bpe_tokenizer, capsys):
    from alphaquant.cli import main

    src = _gguf(tmp_path, bpe_tokenizer, "int4", False, True)
    data = open(src, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert main(["quantize", str(cut), "--plan", "w4a16_g64", "--out", str(tmp_path / "o"), "--no-eval"]) != 0
    err = capsys.readouterr().err
    assert "cut.gguf" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o")
