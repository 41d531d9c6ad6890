"""Quantize a model that does not fit in memory: read, quantize and write one tensor at a time.

For weight-only plans (round to nearest, ``zero_opt``, ``clip_search``, every format) on a
Hugging Face folder of safetensors shards. The model's structure is built on the meta device (no
memory), the plan applied to it to learn every output tensor's name, dtype and shape, and then
each linear/embedding weight is read from its shard (memory-mapped), quantized, written and
dropped: peak memory is a few times the largest tensor, whatever the model's size. Tensors that
are not quantized keep their source dtype unless ``float_dtype`` says otherwise. The output is
the checkpoint folder `load_checkpoint` reads (sharded with ``model.safetensors.index.json``
when it exceeds one shard), written atomically.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Callable, Optional

import torch
from torch import nn

from . import ops
from . import sharded_safetensors as shards
from .checkpoint_file import FORMAT_TAG, _SAFETENSORS_DTYPE, _aliases, _layer_meta
from .formats import LEARNED_FORMATS, NVFP4
from .nn.packed_weight import PackedWeightModule
from .plans import PlanError, apply_plan, build_quantizers, load_plan
from .quantizers.nvfp4 import fused_global_scales

MAX_SHARD_BYTES = 2 << 30
_FP8 = ("fp8", "fp8_e4m3", "fp8_e5m2")


class StreamingError(ValueError):
    """The model or plan cannot be quantized tensor by tensor; the message says why."""


def needs_activations(plan: dict) -> Optional[str]:
    """Why ``plan`` cannot stream (it needs activations or the whole model), or None."""
    if plan.get("rotation", "none") != "none":
        return "a rotated plan changes every layer together"
    if "finetune" in plan:
        return "finetune trains the whole model"
    for s in [plan["default"], *plan["overrides"]]:
        for key in ("act_static", "awq", "smoothquant"):
            if s.get(key):
                return f"{key} calibrates on activations"
        if s.get("algorithm", "rtn") != "rtn":
            return f"{s['algorithm']} calibrates on activations"
    return None


def meta_model(model_dir: str):
    """(config, model on the meta device) for a Hugging Face folder or a GGUF file; no tensor is
    allocated."""
    import transformers

    from .gguf_source import is_gguf_file

    try:
        if is_gguf_file(model_dir):
            folder, name = os.path.split(os.path.abspath(model_dir))
            config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
            config.architectures = config.architectures or ["LlamaForCausalLM"]
        else:
            config = transformers.AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001
        if is_gguf_file(model_dir):
            raise StreamingError(f"could not load a model from {model_dir} (damaged or unsupported GGUF file?): "
                                 f"{type(e).__name__}: {str(e).strip()[:200]}") from None
        raise StreamingError(f"{model_dir} has no usable config.json: {type(e).__name__}: {str(e)[:200]}") from None
    if is_gguf_file(model_dir) and config.model_type not in ("llama", "mistral"):
        raise StreamingError(f"GGUF input streams for Llama-family files; {model_dir} is {config.model_type}")
    is_lm = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = transformers.AutoModelForCausalLM if is_lm else transformers.AutoModel
    with torch.device("meta"):
        model = cls.from_config(config, dtype=torch.float32)
    return config, model.eval()


def _probe_codebooks(model: nn.Module) -> None:
    """Learned code books ([16] or one per row, float16/float32) get their real layout: the
    quantizer is tried once on a 2-row weight of the same width."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, PackedWeightModule) and m.weight_codebook is not None:
            wq, _ = build_quantizers(m.scheme)
            rows, k = m.packed_weight.shape
            cb = wq.quantize_weight(torch.randn(2, k, generator=gen)).codebook
            m.allocate_codebook((rows, 16) if cb.dim() == 2 else (16,), cb.dtype)  # on the meta device


def open_source(path: str, config):
    """The tensors of a safetensors folder (ShardedReader) or of a GGUF file (GGUFSource)."""
    from .gguf_source import GGUFSource, is_gguf_file

    return GGUFSource(path, config) if is_gguf_file(path) else shards.ShardedReader(path)


def check_source(model_dir: str, model: nn.Module, source) -> dict:
    """StreamingError unless ``source`` holds exactly the tensors of the meta-device ``model``, in
    its shapes; returns the model's tied aliases {name: the name it is tied to}."""
    expected = model.state_dict(keep_vars=True)
    tied_source = _aliases(expected)
    missing = sorted(set(expected) - set(tied_source) - set(source.tensors))
    unexpected = sorted(set(source.tensors) - set(expected))
    problems = [f"{len(keys)} weights {what} ({', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''})"
                for keys, what in ((missing, "missing"), (unexpected, "unexpected")) if keys]
    if problems:
        raise StreamingError(f"model {model_dir} does not hold the weights its architecture needs: "
                             + "; ".join(problems))
    for k, v in expected.items():
        if k in source.tensors and tuple(source.tensors[k][1]) != tuple(v.shape):
            raise StreamingError(f"{model_dir}: tensor {k} has shape {list(source.tensors[k][1])}, the config gives "
                                 f"{list(v.shape)}")
    return tied_source


def output_layout(model: nn.Module, plan: dict, source_dtype: Callable, float_dtype: Optional[torch.dtype]):
    """(entries [(name, safetensors dtype, shape)], header metadata, tied aliases) of the checkpoint
    of ``model`` (the plan applied, buffers possibly on the meta device): packed buffers as they
    are, float tensors in ``float_dtype`` or else ``source_dtype(name)`` (None: the model's own)."""
    quantized = {n for n, m in model.named_modules() if isinstance(m, PackedWeightModule)}
    out_state = model.state_dict(keep_vars=True)
    tied_out = _aliases(out_state)
    entries = []
    for k, v in out_state.items():
        if k in tied_out:
            continue
        owner, _, leaf = k.rpartition(".")
        if owner in quantized and leaf.startswith("weight_"):
            dtype = v.dtype
        elif v.is_floating_point():
            dtype = float_dtype or source_dtype(k) or v.dtype
        else:
            dtype = source_dtype(k) or v.dtype
        entries.append((k, _SAFETENSORS_DTYPE[dtype], tuple(v.shape)))
    metadata = {"format": FORMAT_TAG, "plan": json.dumps(plan), "layers": json.dumps(_layer_meta(model)),
                "aliases": json.dumps(tied_out)}
    return entries, metadata, tied_out


def stream_quantize(model_dir: str, plan, out_dir: str, *, float_dtype: Optional[torch.dtype] = None,
                    force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                    progress: Optional[Callable] = None, extra_files: Optional[Callable[[str], None]] = None,
                    meta: Optional[tuple] = None) -> dict:
    """Quantize the model in ``model_dir`` (a safetensors folder, or a Llama GGUF file) with the
    weight-only ``plan`` into the checkpoint folder ``out_dir``, one tensor at a time. Returns the report (layers, totals,
    bytes read and GB/s). ``progress(total_bytes)`` gives an object with ``update(n)`` and
    ``close()`` (e.g. a tqdm bar in bytes); ``extra_files(tmp_dir)`` adds files (tokenizer,
    config) to the folder before it is renamed into place. ``meta``: the (config, meta-device
    model) of :func:`meta_model` when the caller has built it already (the plan is applied to it)."""
    from .cli import atomic_folder
    from .cli.checkpoint_folder import prepare_replacement

    from .utils.heap import bound_heap_growth

    plan = load_plan(plan)
    why = needs_activations(plan)
    if why:
        raise StreamingError(f"the plan cannot be applied one tensor at a time ({why}); it needs the model in memory")
    config, model = meta if meta is not None else meta_model(model_dir)
    source = open_source(model_dir, config)
    tied_source = check_source(model_dir, model, source)
    try:
        report = apply_plan(model, plan, quantize_weights=False)
    except PlanError as e:
        raise StreamingError(f"the plan does not fit {model_dir}: {e}") from None
    _probe_codebooks(model)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, PackedWeightModule)}
    entries, metadata, tied_out = output_layout(model, plan, lambda k: source.torch_dtype(k) if k in source.tensors
                                                else None, float_dtype)
    by_name = {r.name: r for r in report.layers}
    total_in = sum(source.nbytes(k) for k in source.tensors)
    stats = {"bytes_read": 0}

    def source_key(k: str) -> tuple:
        """(the source tensor entry ``k`` is made from, or None when an earlier entry read it)."""
        owner, _, leaf = k.rpartition(".")
        if owner in quantized and leaf.startswith("weight_"):
            key = f"{owner}.weight"
            return owner, (key if key in source.tensors else tied_source.get(key, key))  # a head stored as its tied embedding
        return None, k

    # nvfp4 siblings that engines fuse share one global scale: their max|w| first (one extra read of them)
    def source_amax(name: str) -> float:
        key = source_key(f"{name}.weight_packed")[1]
        with (source.mapped(key) if hasattr(source, "mapped") else contextlib.nullcontext(source.get(key))) as w:
            return float(w.abs().amax()) if w.numel() else 0.0

    fused_scales = fused_global_scales([n for n, m in quantized.items() if m.fmt == NVFP4], source_amax)

    def produce():
        bar = progress(total_in) if progress else None
        current, buffers = None, {}
        reads = []
        for k, _, _ in entries:
            owner, key = source_key(k)
            if owner is None or not reads or owner != reads[-1][0]:
                reads.append((owner, key))
        ahead = _ReadAhead(source, [(key, owner is not None) for owner, key in reads])
        try:
            for k, dtype, shape in entries:
                owner, key = source_key(k)
                if owner is not None:
                    if owner != current:
                        with ahead.next(key) as w:
                            current, buffers = owner, _quantize_one(owner, quantized[owner], key, w, by_name,
                                                                    fused_scales.get(owner))
                            del w  # the source's pages leave memory with the map
                    t = buffers[k.rpartition(".")[2]]
                else:
                    with ahead.next(key) as t:
                        t = t.to(shards._TORCH_DTYPE[dtype])
                if owner is None or k.rpartition(".")[2] == "weight_packed":
                    stats["bytes_read"] += source.nbytes(key)
                    if bar:
                        bar.update(source.nbytes(key))
                yield k, t
        finally:
            ahead.close()
            if bar:
                bar.close()

    out_dir = prepare_replacement(out_dir, force)
    bound_heap_growth()
    t0 = time.time()

    def fill(tmp: str) -> None:
        shards.write_sharded(tmp, entries, produce(), metadata, max_shard_bytes)
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        with open(os.path.join(tmp, "plan.json"), "w") as f:
            json.dump(plan, f, indent=2)
        if extra_files is not None:
            extra_files(tmp)
        data = report.to_dict()
        data.update(streamed=True, bytes_read=stats["bytes_read"], seconds=time.time() - t0,
                    read_gb_per_s=stats["bytes_read"] / 1e9 / max(time.time() - t0, 1e-9))
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(data, f, indent=2)

    try:
        atomic_folder.replace_folder(out_dir, fill)
    finally:
        source.close()
    with open(os.path.join(out_dir, "report.json")) as f:
        return json.load(f)


CHUNK_BYTES = 8 << 20  # float32 bytes of one block of rows quantized at a time (its temporaries stay in the heap)


def _rows_per_chunk(wq, k: int, chunk_bytes: int) -> int:
    """Rows quantized together, 0 for "the whole tensor at once". Rows are independent per group
    and per channel; zero_opt refines its zero points in blocks of (1 << 17) // k rows (with an
    early stop per block), so chunks are whole numbers of those blocks and give the same codes.
    Per-tensor scales, learned code books (fitted to the whole tensor) and nvfp4 (a global scale
    from the whole tensor) take the whole tensor."""
    if wq.config.op_group_size == -1 or wq.fmt in LEARNED_FORMATS or wq.fmt == NVFP4:
        return 0
    block = max(1, (1 << 17) // max(1, k))
    return block * max(1, chunk_bytes // (4 * k) // block)


def _takes_source_dtype(wq) -> bool:
    """Whether the kernel alone picks this quantizer's scales and codes: then it reads bf16/fp16
    directly and gives the codes of the float32 copy (the widening is exact), without making it."""
    from .quantizers.base import BaseQuantizer

    c = wq.config
    return (type(wq).quantize_weight is BaseQuantizer.quantize_weight and wq.static_scale is None
            and not (c.clip_search or c.zero_opt or c.integer_zero_point or c.byte_zero_point))


def quantize_by_rows(wq, w: torch.Tensor, chunk_bytes: int = CHUNK_BYTES, on_chunk: Optional[Callable] = None,
                     **weight_options):
    """``wq.quantize_weight(w.float(), **weight_options)``, computed a block of rows at a time where
    that gives the same codes, so that a large weight (an LM head) never has a full float32 copy and
    its temporaries. ``on_chunk(rows, packed)`` sees each block of ``w`` with its quantized rows
    (e.g. to measure the error while the block is in cache)."""
    from .packed import concat_rows

    direct = _takes_source_dtype(wq) and w.dtype in (torch.float32, torch.bfloat16, torch.float16)
    # The kernel reading the source dtype makes no float32 copy: one call for the whole tensor
    # (half the time of row blocks and their concatenation).
    n = 0 if direct else _rows_per_chunk(wq, w.shape[-1], chunk_bytes)
    n = w.shape[0] if n == 0 else n
    parts = []
    for i in range(0, w.shape[0], n):
        x = w[i:i + n]
        parts.append(wq.quantize_weight(x if direct else x.to(torch.float32), **weight_options))  # float32 as in memory
        if on_chunk is not None:
            on_chunk(x, parts[-1])
    return concat_rows(parts)


class _ErrorMeter:
    """SQNR of quantized blocks against their source rows, accumulated block by block (each block
    decoded while it is in cache; no float copy of the whole weight)."""

    def __init__(self):
        self.noise = self.signal = 0.0

    def __call__(self, x: torch.Tensor, packed) -> None:
        if packed.codebook is None:  # one pass over x and the codes (ops.quantization_error)
            signal, noise = ops.quantization_error(x, packed.data, packed.scale, packed.zero_point, packed.fmt,
                                                   symmetric=packed.symmetric, group_size=packed.group_size).tolist()
            self.signal += signal
            self.noise += noise
            return
        x = x.to(torch.float32)
        deq = packed.dequantize(torch.float32)
        self.signal += float(torch.linalg.vector_norm(x)) ** 2
        self.noise += float(torch.linalg.vector_norm(deq.sub_(x))) ** 2

    def sqnr_db(self) -> float:
        return math.inf if self.noise == 0 else 10 * math.log10(max(self.signal, 1e-30) / self.noise)


class _ReadAhead:
    """Reads the source tensors in the order given, one ahead of the one asked for, on a thread
    (file reads release the GIL), so that reading the next tensor overlaps quantizing this one.
    ``keys``: [(name, mapped)]. A mapped tensor (a weight to quantize, from a source that maps
    its files) is read by the kernel straight from the page cache (``source.mapped``; the thread
    only asks the kernel to read it ahead); the others are copied out (``source.get``).
    :meth:`next` gives a context manager for the tensor."""

    def __init__(self, source, keys: list):
        from concurrent.futures import ThreadPoolExecutor

        can_map = hasattr(source, "mapped")
        self._source, self._keys, self._i = source, [(k, m and can_map) for k, m in keys], 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alphaquant-read")
        self._pending = self._submit(0)

    def _submit(self, i: int):
        if i >= len(self._keys):
            return None
        key, mapped = self._keys[i]
        return self._pool.submit(self._source.prefetch if mapped else self._source.get, key)

    def next(self, key: str):
        import contextlib

        if self._i >= len(self._keys) or self._keys[self._i][0] != key:
            raise RuntimeError(f"read-ahead out of order: asked for {key}")  # a bug, not bad input
        t = self._pending.result()
        mapped = self._keys[self._i][1]
        self._i += 1
        self._pending = self._submit(self._i)
        return self._source.mapped(key) if mapped else contextlib.nullcontext(t)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _finite(w: torch.Tensor) -> bool:
    """No NaN or Inf in ``w``: min and max propagate NaN and show an infinity, in one fast pass."""
    if w.numel() == 0:
        return True
    lo, hi = torch.aminmax(w)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _quantize_one(name: str, module: PackedWeightModule, key: str, w: torch.Tensor, by_name: dict,
                  global_scale: Optional[torch.Tensor] = None) -> dict:
    """Quantize ``w`` (the source tensor ``key``) with the module's scheme (nvfp4: under
    ``global_scale`` when given), return its buffers."""
    wq, _ = build_quantizers(module.scheme)
    non_finite = StreamingError(f"{key} holds NaN or Inf, which {wq.fmt} cannot represent (only fp8 formats hold "
                                f"them); fix the model or skip the layer")
    kernel_checks = _takes_source_dtype(wq)  # the kernel alone sees w, and refuses NaN/Inf itself
    if wq.fmt not in _FP8 and not kernel_checks and not _finite(w):
        raise non_finite
    r = by_name.get(name)
    meter = _ErrorMeter() if r is not None else None
    try:
        options = {} if global_scale is None else {"global_scale": global_scale}
        packed = quantize_by_rows(wq, w, on_chunk=meter, **options)
    except ValueError as e:
        if kernel_checks and "NaN or Inf" in str(e):
            raise non_finite from None
        raise
    rows, k = module.packed_weight.shape
    if tuple(packed.shape) != (rows, k):
        raise StreamingError(f"{key}: shape {list(packed.shape)}, expected {[rows, k]}")
    if r is not None:  # the report gets what the in-memory path reports
        r.sqnr_db = meter.sqnr_db()
        r.bytes_before = w.numel() * w.element_size()
        r.bits_per_weight = 8.0 * r.bytes_after / max(math.prod(w.shape), 1)
    out = {"weight_packed": packed.data, "weight_scale": packed.scale}
    if packed.zero_point is not None:
        out["weight_zero_point"] = packed.zero_point
    if packed.codebook is not None:
        out["weight_codebook"] = packed.codebook
    return out
