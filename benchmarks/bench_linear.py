"""Fused low-bit linear (torch.ops.alphaquant.linear) beside F.linear in the activation dtype.

Weights are rotated among several copies so that they do not sit in the GPU's L2 (or the CPU's
last-level cache) between repeats. Prints time per call and the speedup over F.linear for each shape, batch size M and
format. Usage: python benchmarks/bench_linear.py [--device cpu|cuda] [--shapes 4096x4096,...] [--m 1,4,16]
[--also-isa avx2] (CPU: each format timed a second time, in the same run, with ALPHAQUANT_CPU_ISA set
to that instruction set: e.g. the float32 path that bf16 activations took before AVX-512 BF16)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine, median_time, print_table  # noqa: E402

from alphaquant import ops  # noqa: E402

FORMATS = [("int4", True, 128), ("int8", True, 0), ("fp8_e4m3", True, 0), ("int2", False, 64), ("fp4_e2m1", True, 32),
           ("int6", True, 128), ("nf4", True, 64), ("lut4", True, 64), ("mxfp4_e2m1", True, 32),
           ("mxfp6_e3m2", True, 32), ("mxfp8_e4m3", True, 32), ("mxint8", True, 32), ("nvfp4", True, 16)]
GPU_SHAPES = "4096x4096,4096x14336,14336x4096,8192x28672"


def learned_codebook(w: torch.Tensor, group_size: int):
    from alphaquant.quantizers.registry import lookup

    q_cls, cfg = lookup("lut4")
    return q_cls(cfg(group_size=group_size, dtype="float32")).quantize_weight(w)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help="KxN list (default: Llama shapes on GPU, 4096x4096 on CPU)")
    parser.add_argument("--m", default=None, help="batch sizes (default 1,4,16,64,128 on GPU, 1,4,16 on CPU)")
    parser.add_argument("--formats", default=None, help="comma list among " + ",".join(f for f, _, _ in FORMATS))
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="activations (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--also-isa", default=None, choices=["portable", "avx2", "avx512_vnni"],
                        help="CPU: time each format again with ALPHAQUANT_CPU_ISA set to this")
    args = parser.parse_args()
    dev = args.device
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or (GPU_SHAPES if dev == "cuda" else "4096x4096")).split(",")]
    ms = [int(m) for m in (args.m or ("1,4,16,64,128" if dev == "cuda" else "1,4,16")).split(",")]
    formats = [f for f in FORMATS if args.formats is None or f[0] in args.formats.split(",")]
    act = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev == "cuda" else torch.float32)
    reps = 50 if dev == "cuda" else 10
    print(f"# bench_linear on {machine(dev)}, activations {act}, torch {torch.__version__}")
    rows = []
    for k, n in shapes:
        # enough copies that the set outgrows the GPU's L2 / the CPU's last-level cache (a model's
        # weights are not in cache between tokens); the packed copies are fewer bytes, so as many
        # copies of them are rotated as of the float weight
        if dev == "cuda":
            copies = max(1, min(8, int(200e6 // (k * n * 2))))
        else:
            copies = max(2, min(16, -(-(96 << 20) // (k * n // 2))))
        ws = [torch.randn(n, k, device=dev, dtype=act) for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=act)
            it = iter(range(10**9))
            t_ref = median_time(lambda: F.linear(x, ws[next(it) % copies]), dev, reps)
            row = [f"{k}x{n}", m, f"{t_ref * 1e6:.0f}"]
            for fmt, sym, g in formats:
                it2 = iter(range(10**9))
                if fmt == "lut4":  # a learned code book per tensor: its own op
                    qs = [learned_codebook(w, g) for w in ws]

                    def run():
                        p = qs[next(it2) % copies]
                        return ops.linear_codebook(x, p.data, p.scale, p.codebook, None, group_size=g, k=k)
                else:
                    qs = [ops.quantize(w, fmt, symmetric=sym, group_size=g) for w in ws]

                    def run():
                        p, s, z = qs[next(it2) % copies]
                        return ops.linear(x, p, s, z if z.numel() else None, None, fmt, symmetric=sym, group_size=g,
                                          k=k)

                t = median_time(run, dev, reps)
                row += [f"{t * 1e6:.0f} ({t_ref / t:.2f}x)"]
                if args.also_isa:
                    os.environ["ALPHAQUANT_CPU_ISA"] = args.also_isa
                    try:
                        t = median_time(run, dev, reps)
                    finally:
                        del os.environ["ALPHAQUANT_CPU_ISA"]
                    row += [f"{t * 1e6:.0f} ({t_ref / t:.2f}x)"]
            rows.append(row)
    also = [f" {args.also_isa}"] if args.also_isa else []
    print_table(["KxN", "M", "F.linear us"] + [f"{f}{'' if s else 'a'} g{g}{isa} us (x)" for f, s, g in formats
                                               for isa in [""] + also], rows)


if __name__ == "__main__":
    main()
