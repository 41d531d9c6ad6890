"""Calibrated plans (GPTQ, AWQ, SmoothQuant) on a model that does not fit: one block in memory.

The model is built on the meta device; what lies outside its repeated blocks (embeddings, final
norm, LM head, rotary frequencies) is loaded, and the block-by-block pipeline of
alphaquant.algorithms.sequential runs with hooks that load each block's weights from the source
just before its turn and, once it has produced the next block's calibration inputs, write its
tensors to the output and free it. Calibration activations are carried from block to block in
memory, or on disk past a limit (alphaquant/algorithms/activation_store.py), as in the in-memory
pipeline. The checkpoint is the one the in-memory
path writes (float tensors in float32, the dtype the calibration computed in, unless
``float_dtype`` says otherwise), bit for bit. Plans with static activation scales (their values
go into the file's header, known only at the end), rotation or fine-tuning are refused.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import torch
from torch import nn

from .algorithms.sequential import find_blocks, needs_calibration
from .checkpoint_file import _non_persistent_buffers, _restore_buffers
from .plans import PlanError, apply_plan, load_plan, plan_layers
from .sharded_safetensors import ShardedWriter, _TORCH_DTYPE
from .streaming import (MAX_SHARD_BYTES, StreamingError, _probe_codebooks, check_source, meta_model, open_source,
                        output_layout)


def why_not(plan: dict) -> Optional[str]:
    """Why a calibrated ``plan`` cannot run block by block from disk, or None."""
    if plan.get("rotation", "none") != "none":
        return "a rotated plan changes every layer together"
    if "finetune" in plan:
        return "finetune trains the whole model"
    for s in [plan["default"], *plan["overrides"]]:
        if s.get("act_static"):
            return "act_static scales are stored in the checkpoint's header, known only at the end"
    return None


def is_calibrated(plan: dict) -> bool:
    return any(needs_calibration({"algorithm": "rtn", **s}) for s in [plan["default"], *plan["overrides"]])


def _load_into(module: nn.Module, prefix: str, source, tied: dict, recurse: bool = True) -> None:
    """Allocate ``module``'s tensors on the CPU and read them from ``source`` (``prefix`` + name)."""
    module.to_empty(device="cpu", recurse=recurse)
    params = module.named_parameters(recurse=recurse)
    buffers = module.named_buffers(recurse=recurse)
    with torch.no_grad():
        for name, t in list(params) + list(buffers):
            key = prefix + name
            if key in tied or key not in source.tensors:
                continue  # tied (set again below) or computed (non-persistent buffers)
            src = source.get(key)
            if not torch.isfinite(src).all() and t.is_floating_point():
                raise StreamingError(f"{key} holds NaN or Inf; fix the model")
            t.copy_(src)


def _tie(model: nn.Module, tied: dict) -> None:
    """Point each tied tensor at its target again (to_empty gives every module tensors of its own)."""
    for key, target in tied.items():
        owner, _, leaf = key.rpartition(".")
        t_owner, _, t_leaf = target.rpartition(".")
        src = model.get_submodule(t_owner) if t_owner else model
        dst = model.get_submodule(owner) if owner else model
        setattr(dst, leaf, getattr(src, t_leaf))


def stream_quantize_calibrated(model_dir: str, plan, out_dir: str, calibration_batches: list,
                               forward_fn: Optional[Callable] = None, *, float_dtype: Optional[torch.dtype] = None,
                               force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                               progress: Optional[Callable] = None,
                               extra_files: Optional[Callable[[str], None]] = None) -> dict:
    """Quantize the model in ``model_dir`` (safetensors folder or Llama GGUF file) with the calibrated
    ``plan`` into the checkpoint folder ``out_dir``, one block in memory at a time. Returns the
    report (layers, totals, seconds). ``progress`` wraps an iterable (e.g. tqdm) over the blocks."""
    from .cli import atomic_folder
    from .cli.checkpoint_folder import prepare_replacement
    from .utils.heap import bound_heap_growth, release_free_memory

    plan = load_plan(plan)
    why = why_not(plan)
    if why:
        raise StreamingError(f"the plan cannot run block by block from disk ({why}); it needs the model in memory")
    config, model = meta_model(model_dir)
    source = open_source(model_dir, config)
    try:
        tied = check_source(model_dir, model, source)
        _, shape_model = meta_model(model_dir)  # the checkpoint's layout, from the plan on a second shell
        try:
            apply_plan(shape_model, plan, quantize_weights=False)
        except PlanError as e:
            raise StreamingError(f"the plan does not fit {model_dir}: {e}") from None
        _probe_codebooks(shape_model)
        entries, metadata, _ = output_layout(shape_model, plan, lambda k: None, float_dtype)
        del shape_model
        list_name, blocks = find_blocks(model, plan_layers(model, plan))
        if blocks is None:
            raise StreamingError(f"{model_dir}: no repeated blocks to quantize one at a time")
        block_prefix = f"{list_name}."
        # Header order = the order tensors are produced: each block in turn, then the rest.
        in_block = lambda k: k.startswith(block_prefix) and k[len(block_prefix):].split(".")[0].isdigit()  # noqa: E731
        entries = sorted(entries, key=lambda e: (0, int(e[0][len(block_prefix):].split(".")[0])) if in_block(e[0])
                         else (1, 0))
        dtypes = {k: _TORCH_DTYPE[d] for k, d, _ in entries}
        rebuild = _non_persistent_buffers(model)
        for name, m in model.named_modules():  # everything outside the blocks, loaded once
            if name != list_name and not name.startswith(block_prefix):
                _load_into(m, f"{name}." if name else "", source, tied, recurse=False)
        _tie(model, tied)
        _restore_buffers(model, [(n, m) for n, m in rebuild if not n.startswith(block_prefix)])
    except BaseException:
        source.close()
        raise
    out_dir = prepare_replacement(out_dir, force)
    bound_heap_growth()
    t0 = time.time()

    def fill(tmp: str) -> None:
        writer = ShardedWriter(tmp, entries, metadata, max_shard_bytes)

        def write_state(module: nn.Module, prefix: str) -> None:
            for k, t in module.state_dict(prefix=prefix).items():
                if k in dtypes:
                    writer.write(k, t.to(dtypes[k]))

        loaded = []  # the modules of the block in memory, the float linears it replaces among them

        def before(i: int, block: nn.Module) -> None:
            prefix = f"{block_prefix}{i}."
            _load_into(block, prefix, source, tied)
            _restore_buffers(model, [(n, m) for n, m in rebuild if n.startswith(prefix)])
            loaded[:] = list(block.modules())

        def after(i: int, block: nn.Module) -> None:
            write_state(block, f"{block_prefix}{i}.")
            for m in loaded + list(block.modules()):  # its memory goes back (apply_plan keeps the
                m.to_empty(device="meta", recurse=False)  # replaced linears to restore on failure)
            loaded.clear()
            release_free_memory()

        try:
            report = apply_plan(model, plan, calibration_batches=calibration_batches, forward_fn=forward_fn,
                                progress=progress, block_hooks=(before, after))
        except PlanError as e:
            writer.abort()
            raise StreamingError(f"the plan does not fit {model_dir}: {e}") from None
        except BaseException:
            writer.abort()
            raise
        state = model.state_dict()
        for k, _, _ in entries:
            if not in_block(k):
                writer.write(k, state[k].to(dtypes[k]))
        writer.close()
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        with open(os.path.join(tmp, "plan.json"), "w") as f:
            json.dump(plan, f, indent=2)
        if extra_files is not None:
            extra_files(tmp)
        data = report.to_dict()
        data.update(streamed=True, blockwise=True, seconds=time.time() - t0)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(data, f, indent=2)

    try:
        atomic_folder.replace_folder(out_dir, fill)
    finally:
        source.close()
    with open(os.path.join(out_dir, "report.json")) as f:
        return json.load(f)

