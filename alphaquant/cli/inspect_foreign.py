"""`alphaquant inspect` of the engines' files: a GGUF file's tensors by block type, a
compressed-tensors folder's config groups and stored tensors, and which of them AlphaQuant keeps
as codes when it loads them."""
from __future__ import annotations

import json
import os


def describe_gguf(path: str) -> str:
    import gguf

    from ..export.from_gguf import FLOAT_TYPES, FROM_CODES

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001  the reader fails in many ways on a damaged file
        raise ValueError(f"{path} is not a readable GGUF file: {type(e).__name__}: {str(e)[:200]}") from None
    lines = [f"GGUF file {path}", f"{'tensor':<40} {'type':<8} {'shape':>14} {'bytes':>10}"]
    by_type = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        shape = tuple(int(v) for v in reversed(t.shape.tolist()))  # ggml lists the row length first
        lines.append(f"{t.name:<40} {kind:<8} {str(shape):>14} {int(t.n_bytes):>10}")
        n, b = by_type.get(kind, (0, 0))
        by_type[kind] = (n + 1, b + int(t.n_bytes))
    for kind, (n, b) in sorted(by_type.items()):
        how = ("kept as codes" if kind in FROM_CODES else "float" if kind in FLOAT_TYPES
               else "decoded to float on load (or refused: --gguf-other-types refuse)")
        lines.append(f"{kind}: {n} tensors, {b} bytes: {how}")
    return "\n".join(lines)


def describe_compressed_tensors(path: str) -> str:
    from ..export.from_compressed_tensors import IMPORTED
    from ..sharded_safetensors import ShardedReader  # header reads only

    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f).get("quantization_config") or {}
    lines = [f"compressed-tensors folder {path} (format {qc.get('format')}, status {qc.get('quantization_status')})"]
    for gname, g in (qc.get("config_groups") or {}).items():
        fmt = g.get("format") or qc.get("format")
        w, a = g.get("weights") or {}, g.get("input_activations")
        acts = "float" if not a else f"{a.get('type')}{a.get('num_bits')} {a.get('strategy')}" \
                                     f"{' dynamic' if a.get('dynamic') else ' static'}"
        how = "kept as codes" if fmt in IMPORTED else "not imported"
        lines.append(f"{gname}: {fmt}, weights {w.get('type')}{w.get('num_bits')} "
                     f"{'sym' if w.get('symmetric', True) else 'asym'} {w.get('strategy')}"
                     f"{'' if w.get('group_size') is None else ' ' + str(w.get('group_size'))}, activations {acts}; "
                     f"{len(g.get('targets') or [])} targets; {how}")
    if qc.get("ignore"):
        lines.append(f"kept float (ignore): {', '.join(qc['ignore'][:8])}" + (" ..." if len(qc["ignore"]) > 8 else ""))
    reader = ShardedReader(path)
    total = quantized = 0
    for k, (dtype, _shape, _shard) in reader.tensors.items():
        nbytes = reader.nbytes(k)
        total += nbytes
        if k.rpartition(".")[2] in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape") \
                or (dtype in ("I8", "F8_E4M3") and k.endswith(".weight")):
            quantized += nbytes
    lines.append(f"{quantized} bytes of quantized weights (codes, scales, zero points); "
                 f"{total - quantized} bytes of other tensors; {total} bytes in all")
    return "\n".join(lines)
