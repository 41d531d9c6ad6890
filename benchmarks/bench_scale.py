"""Quantizing and loading a model bigger than what it should cost: peak memory and time per GB.

Makes (once) a synthetic Llama-shaped checkpoint of random bf16 weights with
scripts/make_synthetic_llama.py, then in fresh processes, side by side:
  read      the safetensors library's read of every tensor of the same files (the baseline)
  copy      that read while writing as many bytes as the quantized output has (the I/O any
            streaming quantizer does: on this machine's disk, writes beyond ~2 GB of dirty pages
            go at the disk's write speed)
  quantize  `alphaquant quantize DIR --plan PLAN --no-eval` (the streaming path)
  load      `load_checkpoint` of the result
each with its peak resident memory (getrusage) and seconds; read and quantize run twice: with the
input in the page cache ("warm") and after dropping its pages (posix_fadvise DONTNEED: "cold", a
model read from disk, as one bigger than memory always is).
  calibrated  (--calibrated PLAN) a GPTQ/AWQ plan run a decoder layer at a time from disk
Usage: python benchmarks/bench_scale.py [--gb 8] [--dir /tmp/alphaquant-synthetic] [--plan w4a16_g128]
       [--calibrated gptq_w4_g64 --calib-windows 16] [--hidden 2048 --intermediate 5632]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _timing import print_table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

READ = r"""
import resource, sys, time
from safetensors import safe_open
from alphaquant.sharded_safetensors import ShardedReader
t = time.time()
for shard in ShardedReader(sys.argv[1]).shards:
    with safe_open(shard, "pt") as f:
        for name in f.keys():
            f.get_tensor(name).clone()  # the safetensors library's read, copied out of its map, one alive at a time
print(json.dumps({"s": time.time() - t, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

COPY = r"""
import os, resource, sys, time
import torch
from safetensors import safe_open
from alphaquant.sharded_safetensors import ShardedReader
t = time.time()
left = int(sys.argv[2])  # bytes to write: as many as the quantized output has
with open(sys.argv[3], "wb") as out:
    for shard in ShardedReader(sys.argv[1]).shards:
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                x = f.get_tensor(name).clone().reshape(-1).view(torch.uint8)
                n = min(left, x.numel())
                out.write(memoryview(x[:n].numpy()))
                left -= n
os.remove(sys.argv[3])
print(json.dumps({"s": time.time() - t, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

QUANTIZE = r"""
import resource, sys, time
from alphaquant.cli.main import main
t = time.time()
rc = main(["quantize", sys.argv[1], "--plan", sys.argv[2], "--out", sys.argv[3], "--no-eval", "--force"])
print(json.dumps({"s": time.time() - t, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rc": rc}))
"""

LOAD = r"""
import resource, sys, time
import torch, transformers
from alphaquant.checkpoint_file import load_quantized
from alphaquant.cli.checkpoint_folder import _float_dtype_of
t = time.time()
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):  # as load_checkpoint does (the synthetic model has no tokenizer for it to load)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=_float_dtype_of(sys.argv[1]))
load_quantized(model, sys.argv[1])
print(json.dumps({"s": time.time() - t, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

CALIBRATED = r"""
import resource, sys, time, torch
from alphaquant.streaming_calibrated import stream_quantize_calibrated
g = torch.Generator().manual_seed(0)
vocab = int(sys.argv[4])
ids = [torch.randint(0, vocab, (1, 256), generator=g) for _ in range(int(sys.argv[5]))]  # no tokenizer: random tokens
t = time.time()
stream_quantize_calibrated(sys.argv[1], sys.argv[2], sys.argv[3], ids, force=True)
print(json.dumps({"s": time.time() - t, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

BASELINE = r"""
import resource, json
import torch, transformers, alphaquant.cli.main, alphaquant.streaming  # what every step imports
print(json.dumps({"s": 0, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(code: str, *args) -> dict:
    os.sync()  # a step starts with no earlier step's writes still going to disk (they would slow its own)
    out = subprocess.run([sys.executable, "-c", "import json\n" + code, *args], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def drop_from_page_cache(folder: str) -> None:
    """Evicts the folder's files from the page cache (clean pages; no privileges needed)."""
    for f in os.listdir(folder):
        fd = os.open(os.path.join(folder, f), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=8.0)
    ap.add_argument("--dir", default="/tmp/alphaquant-synthetic")
    ap.add_argument("--plan", default="w4a16_g128")
    ap.add_argument("--calibrated", default=None, help="also run this calibrated plan (e.g. a gptq preset file) "
                    "a layer at a time, on random-token calibration windows (the synthetic model has no tokenizer)")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=None, help="synthetic model shape (default: the script's)")
    ap.add_argument("--intermediate", type=int, default=None)
    a = ap.parse_args()
    shape = [f"--{k}={v}" for k, v in (("hidden", a.hidden), ("intermediate", a.intermediate)) if v]
    src = os.path.join(a.dir, f"llama-{a.gb:g}gb" + "".join(s.replace("--", "-").replace("=", "") for s in shape))
    if not os.path.isdir(src):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_synthetic_llama.py"), src, "--gb",
                        str(a.gb), *shape], check=True)
    out = os.path.join(a.dir, f"llama-{a.gb:g}gb-{a.plan}")
    size_in = folder_bytes(src)
    base = run(BASELINE)
    steps = {}
    size_out = None
    for cache in ("warm", "cold"):
        for step in ("read", "quantize", "copy"):
            code, args = {"read": (READ, (src,)), "quantize": (QUANTIZE, (src, a.plan, out)),
                          "copy": (COPY, (src, str(size_out), out + ".copy"))}[step]
            if cache == "cold":
                drop_from_page_cache(src)
            else:
                run(READ, src)  # the files in the page cache
            steps[step, cache] = run(code, *args)
            size_out = folder_bytes(out) if step == "quantize" else size_out
    load = run(LOAD, out)
    gb = size_in / 1e9
    rows = [["imports only (torch, transformers, alphaquant)", "-", f"{base['peak'] / 1e9:.2f}", "-", "-"]]
    for cache in ("warm", "cold"):
        read, quant, copy = steps["read", cache], steps["quantize", cache], steps["copy", cache]
        rows += [[f"read every tensor (safetensors), {cache}", f"{read['s']:.1f}", f"{read['peak'] / 1e9:.2f}",
                  f"{read['s'] / gb:.2f}", "1.00x"],
                 [f"read + write {size_out / 1e9:.2f} GB (the I/O floor), {cache}", f"{copy['s']:.1f}",
                  f"{copy['peak'] / 1e9:.2f}", f"{copy['s'] / gb:.2f}", f"{copy['s'] / max(read['s'], 1e-9):.2f}x"],
                 [f"alphaquant quantize --plan {a.plan} (streaming), {cache}", f"{quant['s']:.1f}",
                  f"{quant['peak'] / 1e9:.2f}", f"{quant['s'] / gb:.2f}", f"{quant['s'] / max(read['s'], 1e-9):.2f}x"]]
    rows.append([f"load_checkpoint of the result ({size_out / 1e9:.2f} GB)", f"{load['s']:.1f}",
                 f"{load['peak'] / 1e9:.2f}", "-",
                 f"peak / checkpoint {load['peak'] / size_out:.2f}x ({(load['peak'] - base['peak']) / size_out:.2f}x above the imports)"])
    if a.calibrated:
        plan = a.calibrated if os.path.exists(a.calibrated) else os.path.join(ROOT, "alphaquant", "presets",
                                                                             a.calibrated + ".json")
        vocab = json.load(open(os.path.join(src, "config.json")))["vocab_size"]
        cal = run(CALIBRATED, src, plan, out + "-calibrated", str(vocab), str(a.calib_windows))
        rows.append([f"{a.calibrated} a layer at a time ({a.calib_windows} windows of 256 tokens)", f"{cal['s']:.1f}",
                     f"{cal['peak'] / 1e9:.2f}", f"{cal['s'] / gb:.2f}",
                     f"float32 model {2 * size_in / 1e9:.2f} GB"])
    print(f"synthetic Llama checkpoint {src}: {gb:.2f} GB of bf16 weights")
    print_table(["step", "s", "peak RSS GB", "s per GB of input", "vs read"], rows)


if __name__ == "__main__":
    main()
