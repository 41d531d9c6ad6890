"""Checkpoint folders of the command line: packed weights (model.safetensors), the model's config,
its tokenizer and the quantization report, written atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch

from .io import load_quantized, read_metadata, save_quantized

WEIGHTS = "model.safetensors"


def write_checkpoint(out_dir: str, model, tokenizer, plan: dict, report: dict, force: bool = False,
                     chart: Optional[callable] = None) -> None:
    """Write everything into a temporary folder beside ``out_dir``, then rename it into place,
    so an error (a full disk, say) never leaves a half-written checkpoint."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".alphaquant-", dir=parent)
    try:
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
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(path: str, device: Optional[str] = None):
    """(model, tokenizer) from a checkpoint folder; linear weights stay packed (no float copy)."""
    import transformers

    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{path} is not an AlphaQuant checkpoint folder (no {WEIGHTS})")
    read_metadata(weights)  # fails early and clearly on foreign or damaged files
    config = transformers.AutoConfig.from_pretrained(path)
    is_lm = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = transformers.AutoModelForCausalLM if is_lm else transformers.AutoModel
    model = cls.from_config(config, dtype=torch.float32)
    load_quantized(model, weights, device=device)
    if device is not None:
        model.to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def describe(path: str) -> str:
    """What a checkpoint holds: plan, per-layer formats and sizes, totals."""
    from safetensors import safe_open

    weights = os.path.join(path, WEIGHTS) if os.path.isdir(path) else path
    meta = read_metadata(weights)
    sizes, total = {}, 0
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            n = 1
            for d in sl.get_shape():
                n *= d
            nbytes = n * {"U8": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "F64": 8}.get(sl.get_dtype(), 4)
            sizes[key] = nbytes
            total += nbytes
    lines = [f"checkpoint {weights}", f"plan: {json.dumps(meta['plan'])}",
             f"{'layer':<48} {'format':<18} {'group':>6} {'shape':>14} {'bytes':>10}"]
    packed_total = 0
    for name, e in meta["layers"].items():
        nbytes = sum(v for k, v in sizes.items() if k.startswith(name + ".weight_"))
        packed_total += nbytes
        fmt = e["fmt"] + ("" if e["symmetric"] or e["fmt"].startswith("fp") else " asym")
        lines.append(f"{name:<48} {fmt:<18} {e['group_size']:>6} {str(tuple(e['shape'])):>14} {nbytes:>10}")
    lines.append(f"{len(meta['layers'])} quantized layers: {packed_total} bytes packed; "
                 f"{total - packed_total} bytes of other tensors; {total} bytes in all")
    return "\n".join(lines)
