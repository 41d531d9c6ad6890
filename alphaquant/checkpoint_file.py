"""One quantized checkpoint FILE: packed tensors in safetensors, the plan in its metadata.

``save_quantized`` writes it, ``read_metadata`` reads and checks its header (cheap: no tensor
data), ``load_quantized`` loads it into a float model of the same architecture. Every damaged,
foreign or hostile file raises ValueError (or FileNotFoundError) naming what is wrong; sizes in
the header are checked against the file's size before anything is allocated.
(A checkpoint FOLDER with config and tokenizer, as the command line writes, is
``alphaquant.cli.checkpoint_folder``.)
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile

import torch
from torch import nn

from .nn.packed_weight import PackedWeightModule
from .nn.quant_embedding import QuantEmbedding, TiedQuantLinear
from .nn.quant_linear import QuantLinear
from .plans import apply_plan

FORMAT_TAG = "alphaquant/1"

# safetensors dtype names and their sizes in bytes (the format's own table)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_SAFETENSORS_DTYPE = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
                      torch.int32: "I32", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float32: "F32", torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2"}
_FLOAT_NAMES = ("F16", "BF16", "F32", "F64")
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
_LAYER_FIELDS = {"fmt": str, "symmetric": bool, "group_size": int, "shape": list}
# Layers of a learned code book format also record the layout of their code book, which no
# plan key fixes: its shape ([16] or [out, 16]) and its dtype.
_CODEBOOK_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def current_umask() -> int:
    """The process's umask (files we create get ``0o666 & ~umask``, folders ``0o777 & ~umask``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no other portable way to read it; restored at once
    os.umask(mask)
    return mask


def _layer_meta(model: nn.Module) -> dict:
    meta = {}
    for name, m in model.named_modules():
        if isinstance(m, TiedQuantLinear):  # no tensors of its own: the embedding's are used
            e = m.embedding
            meta[name] = {"kind": "tied", "tied_to": m.tied_to, "fmt": e.fmt, "symmetric": e.symmetric,
                          "group_size": e.group_size, "shape": [m.out_features, m.in_features]}
        elif isinstance(m, QuantEmbedding):
            entry = {"kind": "embedding", "fmt": m.fmt, "symmetric": m.symmetric, "group_size": m.group_size,
                     "shape": [m.num_embeddings, m.embedding_dim]}
            if m.weight_codebook is not None:
                entry["codebook_shape"] = list(m.weight_codebook.shape)
                entry["codebook_dtype"] = str(m.weight_codebook.dtype).removeprefix("torch.")
            meta[name] = entry
        elif isinstance(m, QuantLinear):
            entry = {"fmt": m.fmt, "symmetric": m.symmetric, "group_size": m.group_size,
                     "shape": [m.out_features, m.in_features]}
            if m.weight_codebook is not None:
                entry["codebook_shape"] = list(m.weight_codebook.shape)
                entry["codebook_dtype"] = str(m.weight_codebook.dtype).removeprefix("torch.")
            if m.input_rotation is not None:
                entry["input_rotation"] = m.input_rotation
            aq = m.act_quantizer
            if aq is not None and aq.is_static:
                entry["act_scale"] = aq.static_scale.flatten().tolist()
                entry["act_scale_shape"] = list(aq.static_scale.shape)
                if aq.static_zero_point is not None:
                    entry["act_zero_point"] = aq.static_zero_point.flatten().tolist()
            meta[name] = entry
    return meta


def _os_error_of(e: Exception, path: str) -> OSError:
    """safetensors reports write failures (ENOSPC, EACCES) as SafetensorError, not OSError: map them
    back so callers can handle a full disk like any other failed write."""
    m = re.search(r"os error (\d+)", str(e))
    code = int(m.group(1)) if m else errno.EIO
    return OSError(code, f"{os.strerror(code)} (while writing {path})")


def _aliases(state: dict) -> dict:
    """{key: earlier key} for state_dict entries that are the same tensor as an earlier one (tied
    weights, e.g. a float LM head tied to its embedding)."""
    seen, aliases = {}, {}
    for k, v in state.items():
        if v.device.type == "meta":  # no storage to compare: the same tensor object (state_dict(keep_vars=True))
            key = id(v)
        else:
            key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()),
                   v.dtype)
        if key in seen and v.numel() > 0:
            aliases[k] = seen[key]
        else:
            seen.setdefault(key, k)
    return aliases


def save_quantized(model: nn.Module, path: str, plan: dict) -> None:
    """Write the model's state_dict (packed weights, scales, other parameters) and the plan.

    Written to a temporary file in the same folder and renamed, so a failure leaves no
    half-written checkpoint behind. A failed write (a full disk) raises OSError.
    """
    from safetensors.torch import save_file

    state = model.state_dict()
    aliases = _aliases(state)  # tied weights: written once, tied again by the model on load
    tensors = {}
    for k, v in state.items():
        if k in aliases:
            continue
        v = v.detach().cpu().contiguous()
        tensors[k] = v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
    metadata = {"format": FORMAT_TAG, "plan": json.dumps(plan), "layers": json.dumps(_layer_meta(model)),
                "aliases": json.dumps(aliases)}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".alphaquant-", suffix=".tmp")
    os.close(fd)
    try:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except OSError:
            raise
        except Exception as e:  # SafetensorError: its message holds the OS error
            raise _os_error_of(e, path) from e
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_header(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file: tensors maps each name to (dtype, shape, (begin, end)).

    Checks what a damaged or hostile header could get wrong before anything trusts it: the header
    length, its JSON, every dtype, shape and offset against the file's real size.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"checkpoint {path} is truncated ({size} bytes; a safetensors file starts with "
                             f"an 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > _MAX_HEADER_BYTES:
            raise ValueError(f"checkpoint {path} is truncated or not a safetensors file (header of {n} bytes "
                             f"in a file of {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"checkpoint {path} has a damaged header (not UTF-8 JSON: {type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"checkpoint {path} has a damaged header (a JSON {type(header).__name__}, not an object)")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"checkpoint {path} has damaged metadata (must map strings to strings)")
    data_len = size - 8 - n
    tensors = {}
    for name, e in header.items():
        where = f"checkpoint {path}: tensor {name[:80]!r}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{where} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise ValueError(f"{where} has dtype {str(dtype)[:20]!r}; allowed: {', '.join(_DTYPE_BYTES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 8:
            raise ValueError(f"{where} has a bad shape (a list of at most 8 non-negative integers)")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise ValueError(f"{where} has data offsets outside the file's {data_len} bytes of data "
                             f"(truncated or corrupted)")
        nbytes = _DTYPE_BYTES[dtype]
        for d in shape:
            nbytes *= d
            if nbytes > data_len:
                break
        if nbytes != offsets[1] - offsets[0]:
            raise ValueError(f"{where}: shape {shape[:8]} of {dtype} needs {nbytes} bytes but its data offsets "
                             f"span {offsets[1] - offsets[0]}")
        tensors[name] = (dtype, tuple(shape), tuple(offsets))
    return tensors, meta


def _json_field(meta: dict, key: str, path: str, kind: type):
    if key not in meta:
        raise ValueError(f"checkpoint {path}: metadata has no {key!r} field (damaged or written by another tool)")
    try:
        value = json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"checkpoint {path}: metadata field {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise ValueError(f"checkpoint {path}: metadata field {key!r} must be a JSON {kind.__name__}")
    return value


def _check_layer_entry(name: str, e: object, path: str) -> None:
    where = f"checkpoint {path}: metadata of layer {name[:80]!r}"
    if not isinstance(e, dict):
        raise ValueError(f"{where} must be an object")
    for key, kind in _LAYER_FIELDS.items():
        if key not in e:
            raise ValueError(f"{where} has no {key!r} field")
        if not isinstance(e[key], kind) or (kind is int and isinstance(e[key], bool)):
            raise ValueError(f"{where}: {key!r} must be a {kind.__name__}")
    if len(e["shape"]) != 2 or not all(type(d) is int and d > 0 for d in e["shape"]):
        raise ValueError(f"{where}: 'shape' must be two positive integers")
    if "codebook_shape" in e or "codebook_dtype" in e:
        shape, dtype = e.get("codebook_shape"), e.get("codebook_dtype")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
                or not all(type(d) is int and d > 0 for d in shape)):
            raise ValueError(f"{where}: 'codebook_shape' must be a list of one or two positive integers")
        if dtype not in _CODEBOOK_DTYPES:
            raise ValueError(f"{where}: 'codebook_dtype' must be one of {sorted(_CODEBOOK_DTYPES)}")
    if e.get("kind", "linear") not in ("linear", "embedding", "tied"):
        raise ValueError(f"{where}: 'kind' must be linear, embedding or tied")
    if (e.get("kind") == "tied") != ("tied_to" in e) or ("tied_to" in e and not isinstance(e["tied_to"], str)):
        raise ValueError(f"{where}: a tied layer (and only one) names the embedding it uses in 'tied_to'")
    if "input_rotation" in e and e["input_rotation"] != "hadamard":
        raise ValueError(f"{where}: 'input_rotation' must be 'hadamard' when present")
    if "act_scale" in e:
        scale, shape = e["act_scale"], e.get("act_scale_shape")
        zp = e.get("act_zero_point")
        if (not isinstance(scale, list) or not isinstance(shape, list)
                or not all(type(d) is int and d > 0 for d in shape) or math.prod(shape) != len(scale)
                or (zp is not None and (not isinstance(zp, list) or len(zp) != len(scale)))):
            raise ValueError(f"{where}: act_scale, act_scale_shape and act_zero_point do not agree")
        values = scale + (zp or [])
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"{where}: static activation scales and zero points must be finite numbers")
        if not all(v > 0 for v in scale):
            raise ValueError(f"{where}: static activation scales must be positive")


def read_metadata(path: str) -> dict:
    """The AlphaQuant metadata of a checkpoint ({"plan", "layers"}); ValueError naming what is wrong
    for unreadable, foreign or damaged files, FileNotFoundError if there is none."""
    _, meta = read_header(path)
    if meta.get("format") != FORMAT_TAG:
        found = meta.get("format")
        raise ValueError(f"{path} is not an AlphaQuant checkpoint (metadata format "
                         f"{found[:40] if found else found!r}, expected {FORMAT_TAG!r})")
    plan = _json_field(meta, "plan", path, dict)
    layers = _json_field(meta, "layers", path, dict)
    for name, entry in layers.items():
        _check_layer_entry(name, entry, path)
    return {"plan": plan, "layers": layers}


def _check_scale_tensor(key: str, t: torch.Tensor, path: str) -> None:
    """Scales that are zero, negative, NaN or infinite (or non-finite zero points / code books)
    would decode to garbage or divide by zero: a checkpoint holding them is refused."""
    v = t.float()
    if key.endswith(".weight_scale") and t.dtype == torch.uint8:  # MX E8M0 bytes: 255 is NaN
        if (t == 255).any():
            raise ValueError(f"checkpoint {path}: tensor {key} holds {int((t == 255).sum())} E8M0 scale byte(s) 255 "
                             f"(NaN); MX scales must be finite powers of two (bytes 0..254)")
    elif key.endswith(".weight_scale"):
        bad = ~torch.isfinite(v) | (v <= 0)
        if bad.any():
            raise ValueError(f"checkpoint {path}: tensor {key} holds {int(bad.sum())} invalid scale(s) (e.g. "
                             f"{v[bad][0].item()}); scales must be finite and positive")
    elif not torch.isfinite(v).all():
        raise ValueError(f"checkpoint {path}: tensor {key} holds non-finite values")


def _non_persistent_buffers(model: nn.Module) -> list:
    """[(module name, module)] of modules holding buffers that checkpoints do not store (rotary
    frequencies, position ids): on a meta-built model they must be computed again."""
    return [(n, m) for n, m in model.named_modules()
            if any(b in m._non_persistent_buffers_set and t is not None for b, t in m._buffers.items())]


def _restore_buffers(model: nn.Module, modules: list) -> None:
    """Recompute the non-persistent buffers of ``modules`` by building each module again from the
    model's config on the CPU (its __init__ computes them); ValueError if a module cannot be."""
    from .algorithms.rotation import hadamard_factor_matrices

    cfg = getattr(model, "config", None)
    for name, m in modules:
        if getattr(m, "rotation_factors", 0):  # an online input rotation: its Hadamard factors
            for i, f in enumerate(hadamard_factor_matrices(m.in_features)):
                m._buffers[f"rotation_factor{i}"] = f.to(m._buffers[f"rotation_factor{i}"].device)
            continue
        try:
            fresh = type(m)(config=cfg)
        except Exception as e:  # noqa: BLE001  not a config-built module
            raise ValueError(f"cannot recompute the buffers of {name} ({type(m).__name__}) on a meta-built model: "
                             f"{type(e).__name__}: {e}") from None
        for b in m._non_persistent_buffers_set:
            if m._buffers.get(b) is not None:
                m._buffers[b] = fresh._buffers[b].to(device=m._buffers[b].device)


def load_quantized(model: nn.Module, path: str, device=None, device_map=None) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` into a float model of the same
    architecture (its nn.Linear layers are replaced by empty QuantLinears first). ``device_map``
    (see :mod:`alphaquant.placement`): where each module's tensors go; a meta-device model gets
    them allocated there directly."""
    from . import placement
    from .plans import PlanError
    from .sharded_safetensors import ShardedReader

    reader = ShardedReader(path)  # one file, or a folder of shards with its index: headers checked
    tensors = reader.tensors
    meta = read_metadata(reader.shards[0])
    try:
        apply_plan(model, meta["plan"], quantize_weights=False)
    except PlanError as e:
        raise ValueError(f"checkpoint {path}: its plan cannot be applied to this model: {e}") from None
    modules = dict(model.named_modules())
    for name, entry in meta["layers"].items():  # code book layouts, which the plan does not fix
        m = modules.get(name) if "codebook_shape" in entry else None
        if isinstance(m, PackedWeightModule) and m.weight_codebook is not None:
            try:
                m.allocate_codebook(tuple(entry["codebook_shape"]), _CODEBOOK_DTYPES[entry["codebook_dtype"]])
            except ValueError as e:
                raise ValueError(f"checkpoint {path}: layer {name}: {e}") from None
    layers = _layer_meta(model)
    if set(layers) != set(meta["layers"]):
        missing, extra = sorted(set(meta["layers"]) - set(layers)), sorted(set(layers) - set(meta["layers"]))
        raise ValueError(f"checkpoint {path} does not match this model: layers only in the checkpoint {missing[:5]}, "
                         f"only in the model {extra[:5]}")
    for name, entry in meta["layers"].items():
        ours = layers[name]
        for key in ("kind", "tied_to", "fmt", "symmetric", "group_size", "shape", "codebook_shape", "codebook_dtype",
                    "input_rotation"):
            if ours.get(key) != entry.get(key):
                raise ValueError(f"checkpoint {path}: layer {name} has {key}={entry.get(key)!r} but the plan gives "
                                 f"{ours.get(key)!r} for this model")
    model_state = model.state_dict(keep_vars=True)  # the model's own tensors, filled in place below
    tied = _aliases(model_state)  # filled by the model's own tying; older files hold them too
    expected = {k: (_SAFETENSORS_DTYPE.get(v.dtype), tuple(v.shape)) for k, v in model_state.items()}
    for k, (dtype, shape, _) in tensors.items():  # before loading: no tensor of a wrong size is ever allocated
        float_pair = dtype in _FLOAT_NAMES and expected.get(k, ("",))[0] in _FLOAT_NAMES and not k.rpartition(".")[
            2].startswith("weight_")  # float tensors load into the model's float dtype; packed buffers never convert
        if k in expected and expected[k] != (dtype, shape) and not (float_pair and expected[k][1] == shape):
            raise ValueError(f"checkpoint {path} does not match this model: tensor {k} is {dtype} {list(shape)}, "
                             f"the model's is {expected[k][0]} {list(expected[k][1])}")
    if not set(expected) - set(tied) <= set(tensors) <= set(expected):
        missing, extra = sorted(set(expected) - set(tied) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"checkpoint {path} does not match this model's architecture: tensors missing "
                         f"{missing[:5]}, unexpected {[k[:80] for k in extra[:5]]}")
    lean = any(t.device.type == "meta" for t in model_state.values())
    if device is not None and device_map is not None:
        raise ValueError("give device or device_map, not both")
    placed = None  # the model stays where it is (a meta-device one is allocated on the CPU)
    if device is not None or device_map is not None:
        placed = placement.resolve_device_map(model, device if device_map is None else device_map)
    if lean:
        from .utils.heap import bound_heap_growth

        bound_heap_growth()
    rebuild = _non_persistent_buffers(model) if lean else []
    if lean:  # a model built on the meta device: only now is memory allocated, once, for what the file holds
        placement.allocate(model, placed or {"": torch.device("cpu")})
        model_state = model.state_dict(keep_vars=True)
        _restore_buffers(model, rebuild)
    scale_keys = {f"{n}.{b}" for n in layers for b in ("weight_scale", "weight_zero_point", "weight_codebook")}
    try:
        with torch.no_grad():
            for k in sorted(tensors, key=lambda k: k in tied):  # tied copies last: compared with their target
                dst = model_state.get(k)
                if (k not in scale_keys and k not in tied and dst is not None and dst.device.type == "cpu"
                        and dst.is_contiguous() and dst.dtype == reader.torch_dtype(k)
                        and tuple(dst.shape) == tuple(tensors[k][1])):
                    reader.get(k, out=dst)  # straight into the model: no second copy of a large table
                    continue
                t = reader.get(k)
                if k in scale_keys:
                    _check_scale_tensor(k, t, path)
                if k in tied:
                    if not torch.equal(t.to(model_state[k].dtype), model_state[k].cpu()):
                        raise ValueError(f"checkpoint {path}: {k} and {tied[k]} are tied in this model but differ "
                                         f"in the file")
                    continue
                model_state[k].copy_(t)  # one tensor read at a time: memory is the model's plus one tensor
    except ValueError:
        raise
    except Exception as e:  # SafetensorError, short reads
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupted): {e}") from e
    finally:
        reader.close()
    if placed is not None and not lean:
        placement.allocate(model, placed, empty=False)
    for m in model.modules():
        if isinstance(m, PackedWeightModule):
            m.check_scales()
    for name, entry in meta["layers"].items():
        if "act_scale" in entry:
            m = model.get_submodule(name)
            if m.act_quantizer is None:
                raise ValueError(f"checkpoint {path}: layer {name} has static activation scales but its plan "
                                 f"quantizes no activations")
            shape = entry["act_scale_shape"]
            zp = entry.get("act_zero_point")
            try:
                m.act_quantizer.set_static_scales(torch.tensor(entry["act_scale"]).reshape(shape),
                                                  None if zp is None else torch.tensor(zp).reshape(shape))
            except (ValueError, RuntimeError, TypeError) as e:
                raise ValueError(f"checkpoint {path}: layer {name} has static activation scales this model's "
                                 f"plan cannot take: {e}") from None
    return model if placed is None else placement.dispatch(model, placed)
