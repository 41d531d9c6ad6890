"""The checkpoint file (alphaquant.checkpoint_file): damaged metadata and invalid scales are refused
with a ValueError naming the field or tensor; a full disk is an OSError."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from alphaquant.checkpoint_file import FORMAT_TAG, load_quantized, read_metadata, save_quantized
from alphaquant.plans import apply_plan

PLAN = {"default": {"wq": "int4", "symmetric": False, "group_size": 16, "dtype": "float32"}}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    model = small_model()
    apply_plan(model, PLAN)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.safetensors")
    save_quantized(model, path, PLAN)
    return path


def _rewrite(src: str, dst, tensors=None, metadata=None) -> str:
    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata())
    state = load_file(src)
    state.update(tensors or {})
    meta.update(metadata or {})
    save_file(state, str(dst), metadata={k: v for k, v in meta.items() if v is not None})
    return str(dst)


def test_round_trip(saved):
    model = small_model()
    load_quantized(model, saved)
    ref = small_model()
    apply_plan(ref, PLAN)
    x = torch.randn(3, 32)
    assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("field", ["plan", "layers", "format"])
def test_missing_metadata_field_is_named(saved, tmp_path, field):
    path = _rewrite(saved, tmp_path / "m.safetensors", metadata={field: None})
    match = "not an AlphaQuant checkpoint" if field == "format" else f"no '{field}' field"
    with pytest.raises(ValueError, match=match):
        read_metadata(path)


@pytest.mark.parametrize("key", ["fmt", "symmetric", "group_size", "shape"])
def test_missing_layer_field_is_named(saved, tmp_path, key):
    layers = read_metadata(saved)["layers"]
    del layers["0"][key]
    path = _rewrite(saved, tmp_path / "m.safetensors", metadata={"layers": json.dumps(layers)})
    with pytest.raises(ValueError, match=f"layer '0' has no '{key}' field"):
        read_metadata(path)


@pytest.mark.parametrize("value", [float("nan"), 0.0, -1.0, float("inf")])
def test_invalid_weight_scales_are_refused_naming_the_tensor(saved, tmp_path, value):
    scale = load_file(saved)["2.weight_scale"].clone()
    scale.view(-1)[3] = value
    path = _rewrite(saved, tmp_path / "s.safetensors", tensors={"2.weight_scale": scale})
    with pytest.raises(ValueError, match=r"2\.weight_scale .*finite and positive"):
        load_quantized(small_model(), path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_zero_points_are_refused(saved, tmp_path, value):
    zp = load_file(saved)["0.weight_zero_point"].clone()
    zp.view(-1)[0] = value
    path = _rewrite(saved, tmp_path / "z.safetensors", tensors={"0.weight_zero_point": zp})
    with pytest.raises(ValueError, match=r"0\.weight_zero_point holds non-finite"):
        load_quantized(small_model(), path)


def test_wrong_dtype_or_shape_is_refused_before_loading(saved, tmp_path):
    state = load_file(saved)
    path = _rewrite(saved, tmp_path / "d.safetensors", tensors={"0.weight_packed": state["0.weight_packed"].float()})
    with pytest.raises(ValueError, match=r"0\.weight_packed is F32"):
        load_quantized(small_model(), path)


def test_full_disk_is_an_os_error(saved, tmp_path, monkeypatch):
    """safetensors reports ENOSPC as its own SafetensorError; callers must see an OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    model = small_model()
    apply_plan(model, PLAN)
    with pytest.raises(OSError, match="No space left on device") as e:
        save_quantized(model, str(tmp_path / "m.safetensors"), PLAN)
    assert e.value.errno == 28 and os.listdir(tmp_path) == []


def test_saved_file_follows_the_umask(tmp_path):
    model = small_model()
    apply_plan(model, PLAN)
    old = os.umask(0o022)
    try:
        save_quantized(model, str(tmp_path / "m.safetensors"), PLAN)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.safetensors").st_mode & 0o777 == 0o644
    assert read_metadata(str(tmp_path / "m.safetensors"))["plan"]["default"]["wq"] == "int4"
    assert FORMAT_TAG == "alphaquant/1"
