"""Speed of our quantize / dequantize / pack kernels beside the pure-PyTorch reference and clone().

Prints, per format, GB/s (bytes read + written) and ratios: ours over the reference and ours
over clone() of the input (the copy bandwidth ceiling).
Usage: python benchmarks/bench_codecs.py [--device cpu|cuda] [--numel N] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine, median_time, print_table  # noqa: E402

from alphaquant import ops, reference as ref  # noqa: E402
from alphaquant.formats import format_bits  # noqa: E402

SCHEMES = [("int4", True, 128), ("int4", False, 128), ("int2", False, 64), ("int6", True, 128), ("int8", True, 128),
           ("fp8_e4m3", True, 128), ("fp8_e5m2", True, 128), ("fp4_e2m1", True, 32), ("fp6_e2m3", True, 32),
           ("mxfp4_e2m1", True, 32), ("mxfp6_e3m2", True, 32), ("mxfp8_e4m3", True, 32), ("mxint8", True, 32),
           ("nvfp4", True, 16)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--numel", type=int, default=None, help="elements (default 16M on CPU, 64M on GPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-reference", action="store_true", help="skip the slow pure-PyTorch reference")
    args = parser.parse_args()
    dev = args.device
    numel = args.numel or (1 << 24 if dev == "cpu" else 1 << 26)
    dtype = getattr(torch, args.dtype)
    k = 4096
    x = torch.randn(numel // k, k, device=dev).to(dtype)
    in_bytes = x.numel() * x.element_size()
    reps = 5 if dev == "cpu" else 50
    t_clone = median_time(lambda: x.clone(), dev, reps)
    clone_bw = 2 * in_bytes / t_clone
    print(f"# bench_codecs on {machine(dev)}: {x.numel() / 2**20:.0f}M {args.dtype} values "
          f"({in_bytes / 2**20:.0f} MiB), torch {torch.__version__}")
    print(f"# clone(): {t_clone * 1e3:.2f} ms, {clone_bw / 1e9:.1f} GB/s")
    rows = []
    for fmt, sym, g in SCHEMES:
        packed, s, z = ops.quantize(x, fmt, symmetric=sym, group_size=g)
        zp = z if z.numel() else None
        out_bytes = packed.numel() + s.numel() * s.element_size() + z.numel() * z.element_size()
        t_q = median_time(lambda: ops.quantize(x, fmt, symmetric=sym, group_size=g), dev, reps)
        t_d = median_time(lambda: ops.dequantize(packed, s, zp, fmt, symmetric=sym, group_size=g, k=k, dtype=dtype),
                          dev, reps)
        t_f = median_time(lambda: ops.fake_quantize(x, fmt, symmetric=sym, group_size=g), dev, reps)
        codes = ops.unpack(packed, format_bits(fmt), k)
        t_p = median_time(lambda: ops.pack(codes, format_bits(fmt)), dev, reps)
        bw_q = (in_bytes + out_bytes) / t_q
        bw_d = (in_bytes + out_bytes) / t_d
        row = [f"{fmt}{'' if sym else ' asym'} g{g}", f"{t_q * 1e3:.2f}", f"{bw_q / 1e9:.1f}",
               f"{bw_q / clone_bw:.2f}", f"{t_d * 1e3:.2f}", f"{bw_d / 1e9:.1f}", f"{bw_d / clone_bw:.2f}",
               f"{t_f * 1e3:.2f}", f"{t_p * 1e3:.2f}"]
        if not args.no_reference:
            xc = x if dev == "cpu" else x.cpu()
            t_rq = median_time(lambda: ref.quantize(xc, fmt, sym, g), "cpu", 2, 1)
            pc, sc, zc = packed.cpu(), s.cpu(), z.cpu()
            t_rd = median_time(lambda: ref.dequantize(pc, sc, zc, fmt, sym, g, k, dtype), "cpu", 2, 1)
            row += [f"{t_rq * 1e3:.0f}", f"{t_rq / t_q:.1f}x", f"{t_rd * 1e3:.0f}", f"{t_rd / t_d:.1f}x"]
        rows.append(row)
    headers = ["scheme", "quant ms", "GB/s", "/clone", "dequant ms", "GB/s", "/clone", "fake ms", "pack ms"]
    if not args.no_reference:
        headers += ["ref quant ms", "speedup", "ref dequant ms", "speedup"]
    print_table(headers, rows)


if __name__ == "__main__":
    main()
