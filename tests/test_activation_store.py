"""Calibration activations on disk (alphaquant/algorithms/activation_store.py): the sequential
pipeline gives the same quantized model with its block inputs in files, and leaves none behind."""
import copy
import glob
import os
import tempfile

import pytest
import torch

from alphaquant.algorithms import activation_store
from alphaquant.plans import apply_plan
from test_calibrated_plans import W3, batches, tiny_llama


def _spill_folders():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "alphaquant-activations-*")))


@pytest.mark.parametrize("extra", [{"algorithm": "gptq"}, {"awq": True}])
def test_activations_on_disk_give_the_same_model(monkeypatch, extra):
    plan = {"default": {**W3, **extra}}
    ref = tiny_llama()
    in_memory = copy.deepcopy(ref)
    apply_plan(in_memory, plan, calibration_batches=batches(8))
    spilled, seen = [], []
    real_spill, real_close = activation_store.spill, activation_store.SpilledInputs.close

    def spy_spill(inputs, folder=None):
        store = real_spill(inputs, folder)
        spilled.append(store)
        return store

    def spy_close(self):
        seen.append(sorted(os.listdir(self.folder)) if os.path.isdir(self.folder) else None)
        real_close(self)

    before = _spill_folders()
    monkeypatch.setenv(activation_store.ENV_LIMIT, "0")
    monkeypatch.setattr("alphaquant.algorithms.sequential.spill", spy_spill)
    monkeypatch.setattr(activation_store.SpilledInputs, "close", spy_close)
    on_disk = copy.deepcopy(ref)
    apply_plan(on_disk, plan, calibration_batches=batches(8))
    assert spilled and seen and all(files for files in seen if files is not None)  # batches were in files
    # the first block's inputs, then each of the 2 blocks' outputs, each removed once used (the 8
    # windows of 32 tokens are merged into one batch of 256 rows: one file each)
    assert len(spilled) == 1 and [len(files) for files in seen if files is not None] == [1, 1, 1]
    a, b = in_memory.state_dict(), on_disk.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _spill_folders() == before  # every folder removed


def test_the_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(activation_store.ENV_LIMIT, "1.5")
    assert activation_store.activation_limit() == int(1.5 * (1 << 20))
    for bad in ("lots", "-1"):
        monkeypatch.setenv(activation_store.ENV_LIMIT, bad)
        with pytest.raises(ValueError, match="ALPHAQUANT_ACTIVATION_MEMORY_MB must be"):
            activation_store.activation_limit()
    monkeypatch.delenv(activation_store.ENV_LIMIT)
    assert activation_store.activation_limit() > 0


def test_a_failure_removes_the_files(monkeypatch):
    monkeypatch.setenv(activation_store.ENV_LIMIT, "0")
    before = _spill_folders()
    model = tiny_llama()

    def broken(*args, **kwargs):
        raise RuntimeError("stop here")
    monkeypatch.setattr("alphaquant.algorithms.sequential._collect", broken)
    with pytest.raises(RuntimeError, match="stop here"):
        apply_plan(model, {"default": {**W3, "algorithm": "gptq"}}, calibration_batches=batches(4))
    assert _spill_folders() == before
