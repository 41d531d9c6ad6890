"""Checkpoint folders of the command line: packed weights (model.safetensors), the model's config,
its tokenizer, the plan and the quantization report. Written through :mod:`.atomic_folder`, so
an existing checkpoint is replaced only by a complete new one; only checkpoints are ever replaced.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch

from .._logging import logger
from ..checkpoint_file import load_quantized, read_metadata, save_quantized
from . import atomic_folder

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # sharded checkpoints (alphaquant.sharded_safetensors)


class OutputError(ValueError):
    """An output folder that must not be written or replaced; the message says why."""


def is_checkpoint_folder(path: str) -> bool:
    """True if ``path`` is a folder holding our weights file with our metadata tag."""
    try:
        read_metadata(first_shard(path))
    except (OSError, ValueError):
        return False
    return os.path.isdir(path)


def first_shard(path: str) -> str:
    """The weights file of a checkpoint folder that holds the metadata: model.safetensors, or the
    first shard its index lists (sharded checkpoints hold the metadata in every shard)."""
    index = os.path.join(path, INDEX)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, WEIGHTS)) and os.path.isfile(index):
        try:
            with open(index) as f:
                shards = list(dict.fromkeys(json.load(f)["weight_map"].values()))
            return os.path.join(path, os.path.basename(str(shards[0])))
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{index} is not a valid index (JSON with a weight_map)") from None
    return os.path.join(path, WEIGHTS) if os.path.isdir(path) else path


def _recover(path: str) -> None:
    """Repair what an interrupted write of ``path`` left (see atomic_folder.recover), saying so."""
    try:
        for line in atomic_folder.recover(path):
            logger.warning("%s", line)
    except OSError as e:  # a read-only place: work with what is there
        logger.warning("could not repair an interrupted write of %s: %s", path, e)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output(out: str, force: bool, inputs: tuple = ()) -> str:
    """Check that ``out`` can be written (or, with ``force``, replaced) before any long work starts;
    returns its absolute path. ``inputs``: paths (files or folders) that must survive the write.

    Refused with OutputError: an existing file; an existing folder without ``force``; with
    ``force``, a folder that is not an AlphaQuant checkpoint, a symbolic link, a folder holding an
    input or the current folder; a parent that cannot be created or written.
    """
    target = os.path.abspath(out)
    real = os.path.realpath(out)
    _recover(target)
    if os.path.dirname(real) == real:
        raise OutputError(f"--out {out} is the root folder; name a folder to write the checkpoint into")
    cwd = os.path.realpath(os.getcwd())
    if _inside(cwd, real):
        raise OutputError(f"--out {out} is or contains the current folder; choose another output folder")
    for p in inputs:
        rp = os.path.realpath(p)
        if _inside(rp, real):
            raise OutputError(f"--out {out} holds the input {p}; writing there would destroy it")
    if os.path.lexists(target):
        if os.path.islink(target):
            raise OutputError(f"--out {out} is a symbolic link; give the folder it points to")
        if not os.path.isdir(target):
            raise OutputError(f"--out {out} is a file, not a folder")
        if not force:
            raise OutputError(f"output {out} exists; pass --force to replace it")
        if not is_checkpoint_folder(target):
            raise OutputError(f"--out {out} exists and is not an AlphaQuant checkpoint folder (no {WEIGHTS} "
                              f"written by AlphaQuant); --force only replaces checkpoints: choose another folder")
    ancestor = os.path.dirname(target)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputError(f"cannot create --out {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create --out {out}: {ancestor} is not writable")
    return target


def prepare_replacement(out_dir: str, force: bool) -> str:
    """The absolute path of a checkpoint folder about to be written (its parent created): an
    existing one is replaced only with ``force`` (FileExistsError) and only if it is a checkpoint
    (OutputError)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir):
        if not force:
            raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
        if os.path.islink(out_dir) or not is_checkpoint_folder(out_dir):
            raise OutputError(f"{out_dir} is not an AlphaQuant checkpoint folder; it is not replaced")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    return out_dir


def write_checkpoint(out_dir: str, model, tokenizer, plan: dict, report: dict, force: bool = False,
                     chart: Optional[Callable[[dict, str], None]] = None) -> None:
    """Write the checkpoint folder ``out_dir``: complete, or not at all (see :mod:`.atomic_folder`).

    An existing ``out_dir`` is replaced only with ``force`` and only if it is a checkpoint
    (FileExistsError / OutputError otherwise). Write failures (a full disk) raise OSError.
    """
    out_dir = prepare_replacement(out_dir, force)

    def fill(tmp: str) -> None:
        save_quantized(model, os.path.join(tmp, WEIGHTS), plan)
        model.config.architectures = [type(model).__name__]  # GGUF-born configs may lack it
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "plan.json"), "w") as f:
            json.dump(plan, f, indent=2)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        if chart is not None:
            chart(report, os.path.join(tmp, "report.png"))

    atomic_folder.replace_folder(out_dir, fill)


def _weights_of(path: str) -> str:
    if os.path.isdir(path) or not os.path.lexists(path):
        _recover(path)  # an interrupted --force may have left the checkpoint set aside
    weights = first_shard(path)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{path} is not an AlphaQuant checkpoint folder (no {WEIGHTS} nor {INDEX})")
    return weights


def _float_dtype_of(path: str) -> torch.dtype:
    """The dtype most of the checkpoint's float tensors (those left unquantized) are stored in: the
    model is built in it, so that loading does not widen them (bf16 norms stay bf16)."""
    from ..sharded_safetensors import ShardedReader

    reader = ShardedReader(path)
    counts = {}
    for k, (dtype, shape, _) in reader.tensors.items():
        if dtype in ("F32", "F16", "BF16") and not k.rpartition(".")[2].startswith("weight_"):
            counts[dtype] = counts.get(dtype, 0) + reader.nbytes(k)
    best = max(counts, key=counts.get) if counts else "F32"
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[best]


def load_checkpoint(path: str, device: Optional[str] = None, gguf_other_types: str = "dequantize",
                    device_map=None):
    """(model, tokenizer) from a checkpoint folder (ours, or a compressed-tensors folder such as
    llm-compressor writes) or a GGUF file with Q8_0/Q4_0/Q4_1 linears; linear weights stay packed (no
    float copy). ``gguf_other_types``: GGUF tensors of other block types (K-quants) are decoded to
    float with a warning ("dequantize") or the file is refused ("refuse"). ``device`` puts the
    whole model on one device; ``device_map`` ("auto", a device, or {module name: device}, as
    transformers takes it) spreads its layers over several (:mod:`alphaquant.placement`)."""
    import transformers

    from .. import placement
    from ..export.from_compressed_tensors import is_compressed_tensors_folder, load_compressed_tensors

    if device is not None and device_map is not None:
        raise ValueError("give device or device_map, not both")

    def place(model):  # a model loaded on the CPU by an importer
        if device is None and device_map is None:
            return model
        where = placement.resolve_device_map(model, device if device_map is None else device_map)
        placement.allocate(model, where, empty=False)
        return placement.dispatch(model, where)

    if os.path.isfile(path) and path.endswith(".gguf"):  # Q8_0/Q4_0/Q4_1 linears from their codes
        from ..export.from_gguf import load_gguf

        model, tokenizer = load_gguf(path, unsupported=gguf_other_types)
        return place(model), tokenizer
    if os.path.isdir(path) and is_compressed_tensors_folder(path):
        model, tokenizer = load_compressed_tensors(path)
        if tokenizer is None:
            raise ValueError(f"compressed-tensors folder {path} has no usable tokenizer")
        return place(model), tokenizer
    weights = _weights_of(path)
    read_metadata(weights)  # fails early and clearly on foreign or damaged files
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        is_lm = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        cls = transformers.AutoModelForCausalLM if is_lm else transformers.AutoModel
        with torch.device("meta"):  # no memory yet: load_quantized allocates what the file holds, once
            model = cls.from_config(config, dtype=_float_dtype_of(path if os.path.isdir(path) else weights))
    except Exception as e:  # noqa: BLE001  transformers fails in many ways on a damaged config
        raise ValueError(f"checkpoint {path} has no usable config.json: {type(e).__name__}: "
                         f"{str(e).strip()[:200]}") from None
    model = load_quantized(model, path if os.path.isdir(path) else weights, device=device, device_map=device_map)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"checkpoint {path} has no usable tokenizer: {type(e).__name__}: "
                         f"{str(e).strip()[:200]}") from None
    return model.eval(), tokenizer


def describe(path: str) -> str:
    """What a checkpoint holds: plan, per-layer formats and sizes, totals, and what the plan missed
    (for a GGUF file or a compressed-tensors folder: its tensors or config groups)."""
    from ..export.from_compressed_tensors import is_compressed_tensors_folder
    from ..sharded_safetensors import ShardedReader
    from . import inspect_foreign

    if os.path.isfile(path) and path.endswith(".gguf"):
        return inspect_foreign.describe_gguf(path)
    if os.path.isdir(path) and is_compressed_tensors_folder(path):
        return inspect_foreign.describe_compressed_tensors(path)

    weights = _weights_of(path)
    meta = read_metadata(weights)
    reader = ShardedReader(path if os.path.isdir(path) else weights)
    sizes = {k: reader.nbytes(k) for k in reader.tensors}
    total = sum(sizes.values())
    lines = [f"checkpoint {weights}", f"plan: {json.dumps(meta['plan'])}",
             f"{'layer':<48} {'format':<18} {'group':>6} {'shape':>14} {'bytes':>10}"]
    packed_total = 0
    for name, e in meta["layers"].items():
        nbytes = sum(v for k, v in sizes.items() if k.startswith(name + ".weight_"))
        packed_total += nbytes
        fmt = e["fmt"] + ("" if e["symmetric"] or e["fmt"].startswith("fp") else " asym")
        if e.get("kind") == "embedding":
            fmt += " embedding"
        elif e.get("kind") == "tied":
            fmt = f"tied to {e['tied_to']}"
        lines.append(f"{name:<48} {fmt:<18} {e['group_size']:>6} {str(tuple(e['shape'])):>14} {nbytes:>10}")
    lines.append(f"{len(meta['layers'])} quantized layers: {packed_total} bytes packed; "
                 f"{total - packed_total} bytes of other tensors; {total} bytes in all")
    report = _read_report(os.path.dirname(weights))
    skipped = [s for s in _list(report, "skipped") if isinstance(s, str)]
    if skipped:
        lines.append(f"{len(skipped)} linear layers kept in float: {', '.join(skipped[:8])}"
                     + (" ..." if len(skipped) > 8 else ""))
    for u in _list(report, "unmatched_patterns"):
        if isinstance(u, dict):
            lines.append(f"warning: plan pattern {u.get('pattern')!r} (overrides[{u.get('index')}]) "
                         f"matched no layer of the model")
    return "\n".join(lines)


def _read_report(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "report.json")) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _list(report: dict, key: str) -> list:
    value = report.get(key)
    return value if isinstance(value, list) else []
