"""Memory of a quantized model on the CPU's int8-activation path: the bytes its QuantLinear layers
hold and the process's resident memory, before and after the first forward (which builds each
layer's CPU layout), with the layout held in place of the packed buffers (the default) and beside
them (``keep_packed_beside_layout``). Each setting runs in a fresh process.

    python benchmarks/bench_model_memory.py [--model smollm2|random-1b] [--preset cpu_q4_0]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def held_bytes(model) -> int:
    """Bytes of the tensors the quantized linears hold: buffers and CPU layouts."""
    from alphaquant.nn import QuantLinear

    held = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            held.update({id(t): t for t in m._buffers.values() if t is not None})
            layout = m._int8_act_weight
            if layout is not None:
                held.update({id(t): t for t in (layout.packed, layout.codes, layout.params) + (layout.patch or ())
                             if t is not None})
    return sum(t.nbytes for t in held.values())


def measure(model_name: str, preset: str, keep: bool, threads: int) -> dict:
    from alphaquant.cli.models import load_model
    from alphaquant.cli.presets import resolve_plan
    from alphaquant.nn import QuantLinear
    from alphaquant.plans import apply_plan
    from bench_decode import random_llama_1b

    torch.set_num_threads(threads)
    QuantLinear.keep_packed_beside_layout = keep
    base = load_model()
    model = random_llama_1b(base.tokenizer) if model_name == "random-1b" else base.model
    apply_plan(model, resolve_plan(preset)[1])
    ids = torch.arange(16).unsqueeze(0) + 100
    gc.collect()
    proc = psutil.Process()
    before = {"rss": proc.memory_info().rss, "held": held_bytes(model)}
    t = time.perf_counter()
    with torch.no_grad():
        model(ids)
    first = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        model(ids)
    second = time.perf_counter() - t
    gc.collect()
    return {"rss_before": before["rss"], "held_before": before["held"], "rss_after": proc.memory_info().rss,
            "held_after": held_bytes(model), "first_s": first, "second_s": second}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "random-1b"])
    ap.add_argument("--preset", default="cpu_q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["keep", "layout"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.preset, args.child == "keep", args.threads)))
        return
    rows = {}
    for setting in ("layout", "keep"):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--preset", args.preset,
                              "--threads", str(args.threads), "--child", setting],
                             check=True, capture_output=True, text=True).stdout
        rows[setting] = json.loads(out.strip().splitlines()[-1])
    mb = 1 << 20
    print(f"# bench_model_memory: {args.model}, preset {args.preset}, {args.threads} threads, torch {torch.__version__}")
    print("| quantized linears hold | MB before the first forward | MB after | resident MB before | resident MB after "
          "| first forward s (layouts built) | second forward s |")
    print("|---|---|---|---|---|---|---|")
    for setting, label in (("layout", "the layout in place of the packed buffers (default)"),
                           ("keep", "the layout beside the packed codes")):
        r = rows[setting]
        print(f"| {label} | {r['held_before'] / mb:.0f} | {r['held_after'] / mb:.0f} | {r['rss_before'] / mb:.0f} | "
              f"{r['rss_after'] / mb:.0f} | {r['first_s']:.2f} | {r['second_s']:.3f} |")


if __name__ == "__main__":
    main()
