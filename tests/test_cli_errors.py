"""Every bad input ends the command line with one line on stderr and exit status 2; a failed write
with 1; Ctrl-C with 130; no traceback, no temporary folder left, and nothing destroyed."""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from alphaquant.cli import main
from tiny_llama import save_tiny_llama

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "q")
    assert main(["quantize", tiny, "--plan", "w8a16", "--out", out, "--no-eval"]) == 0
    return out


def error_line(capsys, before_model_load=False) -> str:
    """The one error line of a failed run (nothing else at all when it failed before loading)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    if before_model_load:
        assert len(lines) == 1, err
    errors = [line for line in lines if "error:" in line or line == "alphaquant: interrupted"]
    assert len(errors) == 1 and errors[0] == lines[-1].split("\r")[-1], err
    return errors[0]


def no_leftovers(folder) -> bool:
    return not [n for n in os.listdir(folder) if n.startswith(".alphaquant-")]


# --- plans ----------------------------------------------------------------------------------

BAD_PLANS = {
    "not_utf8": (b'{"default": {"wq": "int4", "name": "\xff\xfe"}}', "UTF-8"),
    "list_for_a_name": (json.dumps({"default": {"wq": ["int4"]}}).encode(), "wq"),
    "huge_integer": (b'{"default": {"wq": "int4", "group_size": 1' + b"0" * 40 + b"}}", "group_size"),
    "integer_beyond_json_limit": (b'{"default": {"group_size": 1' + b"0" * 5000 + b"}}", "plan"),
    "deeply_nested": (b'{"default": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "plan"),
    "zero_opt_symmetric": (json.dumps({"default": {"wq": "int4", "zero_opt": True, "symmetric": True}}).encode(),
                           "zero_opt"),
    "not_an_object": (b"[1, 2]", "plan"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_bad_plan_is_one_line_before_the_model_loads(tiny, tmp_path, capsys, case):
    content, word = BAD_PLANS[case]
    plan = tmp_path / "plan.json"
    plan.write_bytes(content)
    assert main(["quantize", tiny, "--plan", str(plan), "--out", str(tmp_path / "out")]) == 2
    line = error_line(capsys, before_model_load=True)
    assert line.startswith("alphaquant: error: ") and word in line
    assert not (tmp_path / "out").exists()


def test_plan_that_is_a_folder(tiny, tmp_path, capsys):
    assert main(["quantize", tiny, "--plan", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "neither a file nor a preset" in error_line(capsys, before_model_load=True)


# --- arguments ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, word", [
    (["quantize", "--eval-tokens", "100"], "--eval-tokens: must be at least 512"),
    (["quantize", "--eval-tokens", "lots"], "not an integer"),
    (["quantize", "--calib-tokens", "10"], "--calib-tokens: must be at least 256"),
    (["eval", "x", "--eval-tokens", "0"], "--eval-tokens"),
    (["generate", "x", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
    (["generate", "x", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_are_one_line(capsys, argv, word):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and word in err


@pytest.mark.parametrize("prompt, word", [("", "empty"), ("   ", "empty"), ("caf\udce9", "UTF-8")])
def test_generate_with_a_bad_prompt(checkpoint, capsys, prompt, word):
    assert main(["generate", checkpoint, "--prompt", prompt]) == 2
    assert word in error_line(capsys, before_model_load=True)


def test_perplexity_needs_a_window():
    import torch

    from alphaquant.cli.evaluation import perplexity

    class TenTokens:
        def __call__(self, text, return_tensors):
            return type("Encoding", (), {"input_ids": torch.zeros(1, 10, dtype=torch.long)})()

    with pytest.raises(ValueError, match="at least one window of 512 tokens"):
        perplexity(None, TenTokens(), "short", n_tokens=4096)


# --- output folder --------------------------------------------------------------------------

def test_force_refuses_a_folder_that_is_not_a_checkpoint(tiny, tmp_path, capsys):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    assert main(["quantize", tiny, "--out", str(precious), "--force"]) == 2
    assert "not an AlphaQuant checkpoint" in error_line(capsys, before_model_load=True)
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_force_refuses_the_current_folder(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("keep")
    assert main(["quantize", tiny, "--out", ".", "--force"]) == 2
    assert "current folder" in error_line(capsys, before_model_load=True)
    assert main(["quantize", tiny, "--out", str(tmp_path.parent), "--force"]) == 2
    assert "current folder" in error_line(capsys, before_model_load=True)
    assert (tmp_path / "file.txt").read_text() == "keep"


def test_force_refuses_the_input_models_folder(tiny, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    for out in (model, tmp_path):  # the model's folder, and a folder holding it
        assert main(["quantize", str(model), "--out", str(out), "--force"]) == 2
        assert "holds the input" in error_line(capsys, before_model_load=True)
    assert sorted(os.listdir(model)) == sorted(os.listdir(tiny))


def test_force_refuses_a_checkpoint_that_is_the_input(checkpoint, tiny, capsys):
    # even a real checkpoint folder is not replaced when the input model lives in it
    model_file = os.path.join(checkpoint, "model.safetensors")
    assert main(["quantize", model_file, "--out", checkpoint, "--force"]) == 2
    assert "holds the input" in error_line(capsys, before_model_load=True)


def test_out_that_cannot_be_written(tiny, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["quantize", tiny, "--out", str(a_file)]) == 2
    assert "is a file" in error_line(capsys, before_model_load=True)
    assert main(["quantize", tiny, "--out", str(a_file / "sub" / "q")]) == 2
    assert "is a file, not a folder" in error_line(capsys, before_model_load=True)
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["quantize", tiny, "--out", str(locked / "q")]) == 2
        assert "not writable" in error_line(capsys, before_model_load=True)


def test_force_replaces_a_checkpoint(checkpoint, tiny, tmp_path, capsys):
    out = tmp_path / "q"
    shutil.copytree(checkpoint, out)
    assert main(["quantize", tiny, "--plan", "w4a16_g128", "--out", str(out), "--force", "--no-eval"]) == 0
    assert json.load(open(out / "report.json"))["plan_name"] == "w4a16_g128"
    assert no_leftovers(tmp_path)


# --- input models ---------------------------------------------------------------------------

def _rewrite_weights(src, dst, change):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = change(load_file(os.path.join(src, "model.safetensors")))
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_missing_weights_are_an_error(tiny, tmp_path, capsys):
    model = _rewrite_weights(tiny, tmp_path / "m", lambda s: {k: v for k, v in s.items() if "layers.1." not in k})
    assert main(["quantize", model, "--out", str(tmp_path / "q"), "--no-eval"]) == 2
    line = error_line(capsys)
    assert "9 weights missing" in line and "model.layers.1." in line
    assert not (tmp_path / "q").exists()


def test_unexpected_weights_are_an_error(tiny, tmp_path, capsys):
    model = _rewrite_weights(tiny, tmp_path / "m", lambda s: {**s, "model.extra.weight": s["lm_head.weight"].clone()})
    assert main(["quantize", model, "--out", str(tmp_path / "q"), "--no-eval"]) == 2
    assert "unexpected (model.extra.weight)" in error_line(capsys)


def _tiny_gguf(path):
    import numpy as np

    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((10, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "huge_counts", "empty", "magic_only"])
def test_damaged_gguf_is_one_line(tmp_path, capsys, damage):
    good = _tiny_gguf(tmp_path / "good.gguf")
    blob = {"truncated": good[:len(good) // 2],
            "garbage": b"GGUF" + struct.pack("<I", 3) + os.urandom(2000),
            "huge_counts": b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62) + good[24:],
            "empty": b"",
            "magic_only": b"GGUF"}[damage]
    path = tmp_path / "model.gguf"
    path.write_bytes(blob)
    assert main(["quantize", str(path), "--out", str(tmp_path / "q"), "--no-eval"]) == 2
    assert "could not load a model" in error_line(capsys)


# --- checkpoints as input -------------------------------------------------------------------

def test_checkpoint_with_a_missing_metadata_field(checkpoint, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "d"
    shutil.copytree(checkpoint, damaged)
    weights = os.path.join(checkpoint, "model.safetensors")
    with safe_open(weights, framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "layers"}
    save_file(load_file(weights), str(damaged / "model.safetensors"), metadata=meta)
    for command in ("inspect", "eval", "generate"):
        assert main([command, str(damaged)]) == 2
        assert "no 'layers' field" in error_line(capsys, before_model_load=True)


def test_a_checkpoint_left_aside_by_a_killed_writer_is_restored_on_read(checkpoint, tmp_path, capsys):
    from alphaquant.cli.atomic_folder import MARKER, OLD_PREFIX

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs
    aside = tmp_path / f"{OLD_PREFIX}q-1234abcd"
    shutil.copytree(checkpoint, aside)
    (aside / MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "start": None,
                                            "target": "q", "role": "old"}))
    assert main(["inspect", str(tmp_path / "q")]) == 0
    assert "quantized layers" in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["q"] and not (tmp_path / "q" / MARKER).exists()


# --- write failures, interruption, the unexpected ---------------------------------------------

def test_full_disk_as_safetensors_reports_it(tiny, tmp_path, capsys, monkeypatch):
    """safetensors raises SafetensorError (not OSError) on ENOSPC; the promised message must appear."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(["quantize", tiny, "--out", str(tmp_path / "q"), "--no-eval", "--in-memory"]) == 1
    line = error_line(capsys)
    assert "No space left on device" in line and "could not write" in line
    assert os.listdir(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (needs root; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_really_full_disk(tiny, small_disk, capsys):
    assert main(["quantize", tiny, "--out", str(small_disk / "q"), "--no-eval"]) == 1
    assert "No space left on device" in error_line(capsys)
    assert os.listdir(small_disk) == []


def test_keyboard_interrupt_is_one_line_and_exit_130(tiny, tmp_path, capsys, monkeypatch):
    import alphaquant.cli.checkpoint_folder as folder

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(folder, "save_quantized", interrupted)
    assert main(["quantize", tiny, "--out", str(tmp_path / "q"), "--no-eval", "--in-memory"]) == 130
    assert error_line(capsys) == "alphaquant: interrupted"
    assert os.listdir(tmp_path) == []


def test_real_sigint_while_writing(tiny, tmp_path):
    """A real SIGINT in a real process: the writer is held in the middle of writing, then signalled."""
    script = (
        "import signal, sys, time\n"
        # a shell without job control starts background jobs with SIGINT ignored (CI under nohup ... &);
        # what is tested is our handling of Ctrl-C, so Python's own handler is put back
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import alphaquant.cli.checkpoint_folder as folder\n"
        "from alphaquant.cli import main\n"
        "def slow(*args, **kwargs):\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "folder.save_quantized = slow\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "q"
    p = subprocess.Popen([sys.executable, "-c", script, "quantize", tiny, "--out", str(out), "--no-eval", "--in-memory"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while p.stdout.readline().strip() != "writing":
            assert time.time() < deadline and p.poll() is None, p.stderr.read()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "alphaquant: interrupted"
    assert os.listdir(tmp_path) == []


def test_unexpected_error_is_one_line_with_a_debug_switch(tiny, tmp_path, capsys, monkeypatch):
    import alphaquant.cli.checkpoint_folder as folder

    def bug(*args, **kwargs):
        raise RuntimeError("something nobody expected\nsecond line")

    monkeypatch.setattr(folder, "save_quantized", bug)
    argv = ["quantize", tiny, "--out", str(tmp_path / "q"), "--no-eval", "--in-memory"]
    monkeypatch.delenv("ALPHAQUANT_DEBUG", raising=False)
    assert main(argv) == 1
    line = error_line(capsys)
    assert "unexpected RuntimeError: something nobody expected" in line and "ALPHAQUANT_DEBUG=1" in line
    monkeypatch.setenv("ALPHAQUANT_DEBUG", "1")
    assert main(argv) == 1
    assert "Traceback" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
