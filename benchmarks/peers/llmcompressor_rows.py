"""llm-compressor (GPTQ, AWQ, RTN) rows for bench_accuracy, evaluated by our own evaluation code.

llm-compressor pins its own torch and transformers, so it lives in a separate venv (README.md
beside this file) and runs there as a subprocess (`llmcompressor_quantize.py`). This module runs
in our venv: it saves the float model and the calibration windows, calls the subprocess once per
scheme (cached in ``cache_dir`` by model, calibration and scheme), loads each compressed-tensors
folder with transformers + compressed-tensors (decompressed to plain float Linear weights), and
measures it with ``eval_fn`` -- the same held-out tokens and code as our rows.

Needs only ``compressed-tensors`` in our venv (pure Python; `pip install -c constraints.txt
compressed-tensors==0.20.0`), never llmcompressor.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Callable, Iterable, Optional

import torch

QUANTIZE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llmcompressor_quantize.py")
DEFAULT_SCHEMES = ("gptq_w4_asym_g64", "gptq_w4_sym_g64", "awq_w4_asym_g64")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
META_FILE = "alphaquant_peer.json"


def default_venv_python() -> Optional[str]:
    """The llmcompressor venv's python at the repo root (`.venv-llmc`), or None if not created."""
    path = os.path.join(REPO_ROOT, ".venv-llmc", "bin", "python")
    return path if os.path.isfile(path) else None


def method_name(scheme: str) -> str:
    """'gptq_w4_asym_g64' -> 'llm-compressor GPTQ W4 asym g64'."""
    algo, bits, sym, group = scheme.split("_")
    return f"llm-compressor {algo.upper()} {bits.upper()} {sym} {group}"


def _hash_tensors(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_float_model(model, tokenizer, folder: str) -> None:
    """``save_pretrained`` of the float model and its tokenizer into ``folder`` (once).

    A model loaded from a GGUF file carries transformers' GGUF quantizer, which refuses to save;
    its weights are already dequantized to float, so the quantizer and its config entry are
    detached for the save and put back after it.
    """
    if os.path.isfile(os.path.join(folder, "done")):
        return
    hf_quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(model.config, "quantization_config", None)
    try:
        if hf_quantizer is not None:
            model.hf_quantizer = None
        if qconfig is not None:
            del model.config.quantization_config
        model.save_pretrained(folder)
    finally:
        if hf_quantizer is not None:
            model.hf_quantizer = hf_quantizer
        if qconfig is not None:
            model.config.quantization_config = qconfig
    tokenizer.save_pretrained(folder)
    open(os.path.join(folder, "done"), "w").close()


def stored_bits_per_weight(folder: str) -> tuple[float, int]:
    """8 * bytes of (weight_packed | weight) + weight_scale + weight_zero_point + weight_g_idx
    over the number of weights, summed over the quantized layers (those with a weight_scale)
    in the folder's safetensors files. Returns (bits per weight, names of the quantized layers)."""
    from safetensors import safe_open

    info = {}  # tensor name -> (shape, bytes per element)
    shapes = {}  # layer prefix -> original weight shape (compressed-tensors' weight_shape tensor)
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            for key in f.keys():
                if key.endswith(".weight_shape"):
                    shapes[key[:-len(".weight_shape")]] = [int(v) for v in f.get_tensor(key).tolist()]
                sl = f.get_slice(key)
                size = torch.empty((), dtype=_dtype(sl.get_dtype())).element_size()
                info[key] = (list(sl.get_shape()), size)

    def nbytes(key):
        shape, size = info[key]
        n = 1
        for s in shape:
            n *= s
        return n * size

    total_bytes = total_weights = 0
    layers = []
    for key in info:
        if not key.endswith(".weight_scale"):
            continue
        prefix = key[:-len(".weight_scale")]
        codes = prefix + ".weight_packed" if prefix + ".weight_packed" in info else prefix + ".weight"
        if codes not in info:
            continue
        shape = shapes.get(prefix) or info[codes][0]
        n = 1
        for s in shape:
            n *= s
        total_weights += n
        total_bytes += sum(nbytes(prefix + s) for s in (".weight_packed", ".weight", ".weight_scale",
                                                        ".weight_zero_point", ".weight_g_idx") if prefix + s in info)
        layers.append(prefix)
    if not layers:
        raise ValueError(f"{folder}: no quantized layers (no *.weight_scale) in its safetensors files")
    return 8.0 * total_bytes / total_weights, layers


def _dtype(name: str) -> torch.dtype:
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    return table[name]


def load_compressed(folder: str, dtype: torch.dtype = torch.float32):
    """Load a compressed-tensors folder into plain float nn.Linear weights (the dequantized values).

    ``CompressedTensorsConfig(dequantize=True)``: transformers 5.24 + compressed-tensors 0.20 cannot
    build the packed modules for a folder written by compressed-tensors 0.19 with asymmetric zero
    points (zero-point shape mismatch, see /work/shared/ENV.md), and our evaluation runs float
    Linear layers anyway. Raises if any weight the model needs was not in the folder."""
    import warnings

    import transformers
    from transformers import CompressedTensorsConfig

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():  # 'quantization_config from the model will be used': it is
            warnings.simplefilter("ignore")  # (only its dequantize flag is taken from ours), as meant
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True),
                output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"{folder}: loading left weights unset or unused: {bad}")
    return model.eval()


def check_levels(model, bits: int, group: int) -> int:
    """Every Linear weight must hold at most 2**bits distinct values in each group of ``group``
    input columns (it came back decompressed, not as the float model). Returns the number of
    Linear layers checked; raises on the first one that is not quantized."""
    n = 0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        w = m.weight.detach()
        if w.shape[1] % group:
            raise AssertionError(f"{name}: {w.shape[1]} input columns, not a multiple of {group}")
        s = w.reshape(w.shape[0], -1, group).sort(dim=-1).values
        levels = (s[..., 1:] != s[..., :-1]).sum(-1) + 1
        if int(levels.max()) > 2 ** bits:
            raise AssertionError(f"{name}: {int(levels.max())} distinct values in a group of {group}, "
                                 f"more than 2**{bits}: not quantized")
        n += 1
    return n


def _unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """[R, W] int32 words -> [R, n] unsigned codes. compressed-tensors' pack-quantized layout (both
    0.19 and 0.20): along each row, code i fills bits [i*bits, (i+1)*bits) of a little-endian bit
    stream of 32-bit words, codes stored as value + 2**(bits-1) (no padding between codes)."""
    if 32 % bits == 0:  # codes never straddle words: shift them out of each word
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64) * bits
        codes = (packed.to(torch.int64).unsqueeze(-1) & 0xFFFFFFFF) >> shifts & ((1 << bits) - 1)
        return codes.reshape(packed.shape[0], -1)[:, :n]
    import numpy as np

    raw = packed.contiguous().numpy().astype("<i4").view(np.uint8).reshape(packed.shape[0], -1)
    stream = np.unpackbits(raw, axis=1, bitorder="little")[:, :n * bits].reshape(packed.shape[0], n, bits)
    codes = (stream.astype(np.int64) << np.arange(bits)).sum(-1)
    return torch.from_numpy(codes)


def reference_dequantize(folder: str, prefix: str, bits: int, group: int) -> torch.Tensor:
    """Our own decoding of one pack-quantized layer from the folder's safetensors:
    w[n, k] = (q[n, k] - zp[n, k // group]) * scale[n, k // group], with q and zp signed
    (stored code - 2**(bits-1)), weight codes packed along the input dim (dim 1) and zero points
    packed along the output dim (dim 0); no zero point (0) when symmetric."""
    from safetensors import safe_open

    tensors = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefix + ".weight"):
                        tensors[key[len(prefix) + 1:]] = f.get_tensor(key)
    rows, cols = (int(v) for v in tensors["weight_shape"].tolist())
    offset = 1 << (bits - 1)
    q = _unpack_int32(tensors["weight_packed"], bits, cols) - offset  # [rows, cols]
    scale = tensors["weight_scale"].to(torch.float32)  # [rows, cols / group]
    zp = torch.zeros_like(scale)
    if "weight_zero_point" in tensors:  # [ceil(rows * bits / 32), groups] int32, packed along rows
        zp = (_unpack_int32(tensors["weight_zero_point"].t(), bits, rows) - offset).t().to(torch.float32)
    if "weight_g_idx" in tensors:
        g = tensors["weight_g_idx"].long()
    else:
        g = torch.arange(cols) // group
    return (q.to(torch.float32) - zp[:, g]) * scale[:, g]


def check_against_safetensors(model, folder: str, bits: int, group: int, prefixes: Iterable[str]) -> float:
    """Largest |loaded weight - reference_dequantize| over ``prefixes``; raises above 1e-5 of the
    weight's range: the decompressor and our reading of the stored layout must agree."""
    worst = 0.0
    modules = dict(model.named_modules())
    for prefix in prefixes:
        ref = reference_dequantize(folder, prefix, bits, group)
        w = modules[prefix].weight.detach().to(torch.float32)
        err = (w - ref).abs().max().item()
        if err > 1e-5 * max(ref.abs().max().item(), 1e-12):
            raise AssertionError(f"{folder}: {prefix} loaded weight differs from the stored codes by {err}")
        worst = max(worst, err)
    return worst


def llmcompressor_rows(model, tokenizer, calib_windows, eval_fn: Callable, venv_python: str,
                       schemes: Iterable[str] = DEFAULT_SCHEMES, cache_dir: str = "/tmp/alphaquant-llmc",
                       nice: int = 0, timeout: Optional[float] = None, log=None) -> list:
    """Rows ``(method, bits_per_weight, metric, seconds)``, one per scheme, in ``schemes`` order.

    model, tokenizer: the float Hugging Face causal LM (not modified) and its tokenizer.
    calib_windows: the [1, T] int64 token-id tensors our rows calibrate on (all are used).
    eval_fn(model) -> float: our metric on the held-out tokens, called on each loaded peer model.
    venv_python: python of the venv that has llmcompressor (``default_venv_python()``).
    schemes: names understood by llmcompressor_quantize.py (e.g. 'gptq_w4_asym_g64').
    cache_dir: holds the float model folder, the calibration file and one folder per
      (scheme, model weights, calibration tokens, quantize script); an existing complete folder
      is reused, not re-quantized.
    nice: run the subprocess under ``nice -n NICE`` when > 0.

    bits_per_weight is as stored (see stored_bits_per_weight). seconds = llm-compressor's load +
    oneshot + save time (as recorded when the folder was made, so also for a cached folder) + our
    load and evaluation now. A scheme that fails gives the row (method, None, 'failed: ...', None).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not venv_python or not os.path.isfile(venv_python):
        raise FileNotFoundError(f"llmcompressor venv python {venv_python!r} not found; "
                                f"see {os.path.join(os.path.dirname(QUANTIZE_SCRIPT), 'README.md')}")
    windows = [w.detach().cpu().to(torch.int64) for w in calib_windows]
    if not windows or any(w.dim() != 2 or w.shape[0] != 1 for w in windows):
        raise ValueError("calib_windows: expected a non-empty list of [1, T] token-id tensors")
    os.makedirs(cache_dir, exist_ok=True)
    model_hash = _hash_tensors(model.state_dict().values())[:12]
    calib_hash = _hash_tensors(windows)[:12]
    with open(QUANTIZE_SCRIPT, "rb") as f:  # a changed recipe must not reuse an old folder
        script_hash = hashlib.sha256(f.read()).hexdigest()[:8]
    float_dir = os.path.join(cache_dir, f"float-{model_hash}")
    save_float_model(model, tokenizer, float_dir)
    calib_file = os.path.join(cache_dir, f"calib-{calib_hash}.pt")
    if not os.path.isfile(calib_file):
        torch.save(windows, calib_file + ".tmp")
        os.replace(calib_file + ".tmp", calib_file)

    rows = []
    for scheme in schemes:
        name = method_name(scheme)
        out = os.path.join(cache_dir, f"{scheme}-{model_hash}-{calib_hash}-{script_hash}")
        t0 = time.time()
        try:
            if os.path.isfile(os.path.join(out, META_FILE)):
                log(f"[llm-compressor] {scheme}: cached {out}")
            else:
                cmd = [venv_python, QUANTIZE_SCRIPT, "--model", float_dir, "--calib", calib_file,
                       "--scheme", scheme, "--out", out]
                if nice > 0:
                    cmd = ["nice", "-n", str(nice)] + cmd
                log_path = out + ".log"
                log(f"[llm-compressor] {scheme}: quantizing ({len(windows)} windows), log in {log_path}")
                env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
                env.pop("PYTHONPATH", None)
                with open(log_path, "w") as f:
                    p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
                if p.returncode != 0:
                    with open(log_path) as f:
                        tail = f.read()[-2000:]
                    raise RuntimeError(f"quantize script exited {p.returncode}: ...{tail}")
            with open(os.path.join(out, META_FILE)) as f:
                meta = json.load(f)
            bits, layers = stored_bits_per_weight(out)
            t1 = time.time()
            peer = load_compressed(out)
            checked = check_levels(peer, meta["bits"], meta["group_size"])
            probe = sorted({layers[0], layers[-1], *(n for n in layers if n.endswith("lm_head"))})
            check_against_safetensors(peer, out, meta["bits"], meta["group_size"], probe)
            value = eval_fn(peer)
            t2 = time.time()
            seconds = sum(meta["seconds"].values()) + (t2 - t1)
            log(f"[llm-compressor] {scheme}: {len(layers)} quantized layers stored "
                f"(lm_head {'quantized' if any(n.endswith('lm_head') for n in layers) else 'NOT quantized'}), "
                f"{checked} Linear of <= 2**{meta['bits']} levels per group, {', '.join(probe)} match our decoding, "
                f"{meta['calibration_windows']} windows, {bits:.4f} bits/weight, metric {value:.4f}, "
                f"oneshot {meta['seconds']['oneshot']} s, load+eval {t2 - t1:.0f} s")
            rows.append((name, bits, value, seconds))
            del peer
        except Exception as e:  # noqa: BLE001  a peer that fails is reported, not hidden
            log(f"[llm-compressor] {scheme} failed after {time.time() - t0:.0f} s: {type(e).__name__}: {e}")
            rows.append((name, None, f"failed: {type(e).__name__}: {str(e)[:200]}", None))
    return rows


def main() -> None:
    """SmolLM2-135M end to end, as bench_accuracy would: the float row, then one row per scheme."""
    import argparse

    from alphaquant.cli import evaluation
    from alphaquant.cli.models import load_model

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES))
    parser.add_argument("--venv-python", default=default_venv_python())
    parser.add_argument("--cache-dir", default="/tmp/alphaquant-llmc")
    parser.add_argument("--windows", type=int, default=128, help="at most this many 256-token windows")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--nice", type=int, default=10)
    args = parser.parse_args()
    loaded = load_model()
    calib_text, eval_text = evaluation.split_text(evaluation.corpus_text())
    windows = list(evaluation.token_windows(loaded.tokenizer, calib_text, args.windows * 256, 256))

    def eval_fn(m):
        return evaluation.perplexity(m, loaded.tokenizer, eval_text, args.eval_tokens)

    t = time.time()
    rows = [("float32", 32.0, eval_fn(loaded.model), time.time() - t)]
    rows += llmcompressor_rows(loaded.model, loaded.tokenizer, windows, eval_fn, args.venv_python,
                               args.schemes.split(","), args.cache_dir, nice=args.nice)
    print(f"\n# SmolLM2-135M, {len(windows)} calibration windows of 256 tokens, perplexity on "
          f"{args.eval_tokens} held-out tokens, torch {torch.__version__}")
    print("| method | bits/weight | perplexity | s |\n|---|---|---|---|")
    for name, bits, value, seconds in rows:
        b = "-" if bits is None else f"{bits:.4f}"
        v = value if isinstance(value, str) else f"{value:.4f}"
        print(f"| {name} | {b} | {v} | {'-' if seconds is None else f'{seconds:.0f}'} |")


if __name__ == "__main__":
    main()
