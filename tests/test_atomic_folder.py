"""Replacing an output folder: a kill (SIGKILL) or Ctrl-C at any step leaves the old or the new
folder complete at its path, and the next run restores or cleans what was left."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys

import pytest

from alphaquant.cli import atomic_folder
from alphaquant.cli.atomic_folder import MARKER, STEPS, recover, replace_folder

OLD = {"model.safetensors": "old weights", "config.json": "old config"}
NEW = {"model.safetensors": "new weights", "report.json": "new report", "sub/tokenizer.json": "new tokenizer"}
# steps after which the new folder is in place
NEW_IN_PLACE = {"renamed", "unmarked", "deleting-old", "emptied-old"}


def _fill(files, kill_midway=False):
    def fill(folder):
        for i, (name, text) in enumerate(files.items()):
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
            if kill_midway and i == 0:
                os.kill(os.getpid(), signal.SIGKILL)
    return fill


def _content(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            if name != MARKER:
                out[os.path.relpath(p, folder)] = open(p).read()
    return out


def _killed_writer(target, step):
    """Fork a writer that replaces ``target`` and SIGKILLs itself at ``step``."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            atomic_folder._after_step = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == step else None
            replace_folder(target, _fill(NEW, kill_midway=step == "filling"))
        finally:
            os._exit(3)  # the step was never reached
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"writer exited with {status}"


@pytest.mark.parametrize("step", ("filling",) + STEPS)
def test_kill_at_each_step_loses_nothing_and_the_next_run_recovers(tmp_path, step):
    target = str(tmp_path / "ckpt")
    replace_folder(target, _fill(OLD))
    _killed_writer(target, step)
    leftovers = [n for n in os.listdir(tmp_path) if n != "ckpt"]
    if os.path.exists(target):
        assert _content(target) == (NEW if step in NEW_IN_PLACE else OLD)
    else:  # between the two renames: the old folder is complete under its hidden name
        assert step == "set-aside"
        assert len(leftovers) == 2
        aside = next(n for n in leftovers if n.startswith(atomic_folder.OLD_PREFIX))
        assert _content(tmp_path / aside) == OLD
    recover(target)
    assert os.listdir(tmp_path) == ["ckpt"]
    assert _content(target) == (NEW if step in NEW_IN_PLACE else OLD)
    assert not os.path.exists(os.path.join(target, MARKER))
    # and the next write goes through as if nothing had happened
    replace_folder(target, _fill({"model.safetensors": "third"}))
    assert _content(target) == {"model.safetensors": "third"} and os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("step", STEPS)
def test_ctrl_c_at_each_step_leaves_one_complete_folder_and_nothing_else(tmp_path, monkeypatch, step):
    target = str(tmp_path / "ckpt")
    replace_folder(target, _fill(OLD))

    fired = []

    def interrupt(s):
        if s == step and not fired:  # one Ctrl-C
            fired.append(s)
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic_folder, "_after_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(target, _fill(NEW))
    assert os.listdir(tmp_path) == ["ckpt"]
    assert _content(target) == (NEW if step in NEW_IN_PLACE else OLD)
    assert not os.path.exists(os.path.join(target, MARKER))


def test_error_while_filling_leaves_no_temp_folder_and_no_target(tmp_path):
    def fail(folder):
        open(os.path.join(folder, "half"), "w").close()
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        replace_folder(str(tmp_path / "new"), fail)
    assert os.listdir(tmp_path) == []


def test_leftovers_that_are_not_provably_ours_are_left_alone(tmp_path):
    target = tmp_path / "ckpt"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cases = {"live": {"host": socket.gethostname(), "pid": sleeper.pid, "start": None},
                 "remote": {"host": "another-machine.example", "pid": 1, "start": None}}
        for name, who in cases.items():
            folder = tmp_path / f"{atomic_folder.NEW_PREFIX}ckpt-{name}"
            folder.mkdir()
            (folder / MARKER).write_text(json.dumps({**who, "target": "ckpt", "role": "new"}))
            (folder / "model.safetensors").write_text("x")
        unmarked = tmp_path / f"{atomic_folder.OLD_PREFIX}ckpt-unmarked"
        unmarked.mkdir()
        (unmarked / "data").write_text("somebody's")
        assert recover(str(target)) == []
        assert len(os.listdir(tmp_path)) == 3 and not target.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # once the writer is gone, its leftover is removed
    recover(str(target))
    assert sorted(os.listdir(tmp_path)) == sorted([f"{atomic_folder.NEW_PREFIX}ckpt-remote",
                                                   f"{atomic_folder.OLD_PREFIX}ckpt-unmarked"])


def test_folder_modes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        replace_folder(str(tmp_path / "ckpt"), _fill(NEW))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "ckpt").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(tmp_path / "ckpt" / "sub").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(tmp_path / "ckpt" / "model.safetensors").st_mode) == 0o640
