"""Fuzzing the checkpoint reader: damaged or hostile files (bytes flipped, truncated, headers with
wrong offsets, dtypes or huge shapes, garbage metadata) give ValueError or FileNotFoundError from
read_metadata, load_quantized and describe: never a crash, another exception or a huge allocation."""
import json
import os
import resource
import struct
import tempfile

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from alphaquant.checkpoint_file import load_quantized, read_metadata, save_quantized  # noqa: E402
from alphaquant.cli.checkpoint_folder import describe  # noqa: E402
from alphaquant.plans import apply_plan  # noqa: E402

PLAN = {"default": {"wq": "int4", "symmetric": False, "group_size": 16, "dtype": "float32"}}
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = ["U8", "I8", "F16", "BF16", "F32", "F64", "I64", "BOOL", "F8_E4M3", "X9", "", "f32"]


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))


class Sample(tuple):
    """(header dict, data bytes, whole file bytes) of a valid checkpoint; short in failure reports."""

    def __repr__(self):
        return f"<checkpoint of {len(self[2])} bytes>"


@pytest.fixture(scope="module")
def good():
    model = small_model()
    apply_plan(model, PLAN)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        save_quantized(model, path, PLAN)
        raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    return Sample((json.loads(raw[8:8 + n]), raw[8 + n:], raw))


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield d


def _read_everything(blob: bytes, folder: str) -> None:
    path = os.path.join(folder, "model.safetensors")
    with open(path, "wb") as f:
        f.write(blob)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # a huge allocation fails loudly (MemoryError, not a swap storm) with 4 GiB of address space to spare
    cap = _address_space() + (4 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        for read in (read_metadata, lambda p: load_quantized(small_model(), p), describe):
            try:
                read(path)
            except (ValueError, FileNotFoundError):
                pass
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _address_space() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def _file(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@SETTINGS
@given(cuts=st.lists(st.tuples(st.integers(0, 4000), st.binary(min_size=1, max_size=8)), max_size=4),
       length=st.one_of(st.none(), st.integers(0, 4000)))
def test_flipped_and_truncated_bytes(good, workdir, cuts, length):
    blob = bytearray(good[2])
    for pos, junk in cuts:
        pos %= len(blob)
        blob[pos:pos + len(junk)] = junk
    _read_everything(bytes(blob[:length] if length is not None else blob), workdir)


@SETTINGS
@given(n=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 7, 2**31, 2**63, 2**64 - 1])))
def test_header_length_field(good, workdir, n):
    _read_everything(struct.pack("<Q", n) + good[2][8:], workdir)


huge = st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1, 2**64, -1, 10**30])
dims = st.lists(st.one_of(st.integers(0, 64), huge), max_size=5)
offsets = st.lists(st.one_of(st.integers(0, 5000), huge), min_size=0, max_size=3)


@SETTINGS
@given(data=st.data())
def test_hostile_tensor_entries(good, workdir, data):
    header, payload, _ = good
    header = json.loads(json.dumps(header))
    names = sorted(k for k in header if k != "__metadata__")
    for name in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)):
        entry = header[name]
        if not isinstance(entry, dict):  # already replaced by junk
            continue
        what = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "junk"]))
        if what == "dtype":
            entry["dtype"] = data.draw(st.one_of(st.sampled_from(DTYPES), st.integers(), st.none()))
        elif what == "shape":
            entry["shape"] = data.draw(st.one_of(dims, st.text(max_size=3), st.integers()))
        elif what == "data_offsets":
            entry["data_offsets"] = data.draw(st.one_of(offsets, st.none()))
        elif what == "drop":
            del entry[data.draw(st.sampled_from(sorted(entry)))]
        else:
            header[name] = data.draw(st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3)))
    _read_everything(_file(header, payload), workdir)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=12)


@SETTINGS
@given(data=st.data())
def test_garbage_metadata(good, workdir, data):
    header, payload, _ = good
    header = json.loads(json.dumps(header))
    meta = header["__metadata__"]
    layers = json.loads(meta["layers"])
    kind = data.draw(st.sampled_from(["field_text", "field_json", "layer_entry", "layer_value", "metadata"]))
    if kind == "field_text":
        meta[data.draw(st.sampled_from(["plan", "layers", "format"]))] = data.draw(st.text(max_size=20))
    elif kind == "field_json":
        meta[data.draw(st.sampled_from(["plan", "layers"]))] = json.dumps(data.draw(json_values))
    elif kind == "layer_entry":
        layers[data.draw(st.sampled_from(sorted(layers)))] = data.draw(json_values)
        meta["layers"] = json.dumps(layers)
    elif kind == "layer_value":
        entry = layers[data.draw(st.sampled_from(sorted(layers)))]
        entry[data.draw(st.sampled_from(["fmt", "symmetric", "group_size", "shape", "act_scale",
                                         "act_scale_shape", "act_zero_point"]))] = data.draw(json_values)
        meta["layers"] = json.dumps(layers)
    else:
        header["__metadata__"] = data.draw(json_values)
    _read_everything(_file(header, payload), workdir)


def test_a_valid_file_still_loads(good, workdir):
    """The fuzzing above must not pass because everything is refused."""
    path = os.path.join(workdir, "model.safetensors")
    with open(path, "wb") as f:
        f.write(good[2])
    model = load_quantized(small_model(), path)
    assert model(torch.randn(2, 32)).shape == (2, 8)
    assert "2 quantized layers" in describe(path)
