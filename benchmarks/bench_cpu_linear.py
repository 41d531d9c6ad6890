"""CPU linear layers beside their peers, in one run: F.linear in the activation dtype, torch's own
CPU int4 kernel (_weight_int4pack_mm_for_cpu), and ours with float activations (ops.linear) and
with int8 activations (ops.linear_int8_act, the instruction set ops.cpu_isa() names).

Scales are float16 (as the CPU presets and GGUF's Q4_0/Q8_0 store them; MX keeps its E8M0
bytes). Every weight is rotated among enough copies that the set is larger than the last-level cache (a
model's weights do not sit in cache between tokens); the memory read bandwidth is measured first
(a large sum) and M = 1 rows say what share of it our int8-activation int4 layer reads at.
Usage: python benchmarks/bench_cpu_linear.py [--shapes 4096x4096,4096x14336] [--m 1,4,16,64,256]
       [--dtypes float32,bfloat16] [--threads 2]
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

CACHE_BYTES = 96 << 20  # more than this machine's 32 MiB L3, with margin
# (format, symmetric, group_size) of our int8-activation columns; int4 g128 also in float activations
INT8_ACT = [("int4", True, 128), ("int4", True, 32), ("int8", True, 32), ("int2", False, 64), ("fp4_e2m1", True, 32),
            ("mxfp6_e2m3", True, 32), ("nvfp4", True, 16)]


def read_bandwidth() -> float:
    """Bytes per second of a sum over 1 GiB of float32 (the memory read bandwidth these threads get)."""
    big = torch.ones(1 << 28)
    t = median_time(lambda: big.sum(), "cpu", 5)
    return big.numel() * 4 / t


def copies_for(nbytes: int) -> int:
    return max(1, -(-CACHE_BYTES // nbytes))


class Rotating:
    """Calls fn on a new copy of its arguments each time (round robin)."""

    def __init__(self, items, fn):
        self.items, self.fn, self.i = items, fn, 0

    def __call__(self):
        self.i += 1
        return self.fn(*self.items[self.i % len(self.items)])


def torch_int4(w: torch.Tensor, group: int, dtype: torch.dtype):
    """torch's CPU int4 weight (asymmetric codes 0..15, scale and zero per group) for w [n, k]."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).reshape(n, k).to(torch.int32)
    zero = lo + 8 * scale  # value = (code - 8) * scale + zero
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
    return packed, torch.stack([scale.T, zero.T], -1).contiguous().to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="4096x4096,4096x14336", help="KxN list")
    parser.add_argument("--m", default="1,4,16,64,256")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = read_bandwidth()
    print(f"# bench_cpu_linear on {machine('cpu')}, torch {torch.__version__}, int8 activations on "
          f"{ops.cpu_isa()}, read bandwidth {bw / 1e9:.1f} GB/s")
    headers = ["KxN", "dtype", "M", "F.linear us", "torch int4 g128", "ours int4 g128 float-act"]
    headers += [f"ours {f}{'' if s else ' asym'} g{g} int8-act" for f, s, g in INT8_ACT]
    headers += ["int4 g128 int8-act GB/s (% of read)"]
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k)
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            dense = [(w.to(dtype),) for _ in range(copies_for(n * k * w.to(dtype).element_size()))]
            t4 = [torch_int4(w, 128, dtype) for _ in range(copies_for(n * k // 2))]
            ours = {}
            for fmt, sym, g in [("int4", True, 128)] + INT8_ACT:
                p, s, z = ops.quantize(w, fmt, symmetric=sym, group_size=g)
                z = None if sym and fmt != "nvfp4" else z  # nvfp4's third tensor: its global scale
                if s.dtype == torch.float32:
                    s = s.half()  # float16 scales, as the CPU presets and GGUF store them
                codes, params = ops.int8_act_layout(p, s, z, fmt, symmetric=sym, group_size=g, k=k)
                c = copies_for(codes.numel() + params.numel() * 4)
                ours[(fmt, sym, g)] = ([(p.clone(), s.clone(), z) for _ in range(c)],
                                       [(codes.clone(), params.clone()) for _ in range(c)])
            for m in (int(v) for v in args.m.split(",")):
                x = torch.randn(m, k).to(dtype)
                t_ref = median_time(Rotating(dense, lambda wd: F.linear(x, wd)), "cpu")
                row = [shape, str(dtype).removeprefix("torch."), m, f"{t_ref * 1e6:.0f}"]

                def cell(fn):
                    t = median_time(fn, "cpu")
                    return t, f"{t * 1e6:.0f} ({t_ref / t:.2f}x)"

                row.append(cell(Rotating(t4, lambda wp, sz: torch._weight_int4pack_mm_for_cpu(x, wp, 128, sz)))[1])
                plain, _ = ours[("int4", True, 128)]
                row.append(cell(Rotating(plain, lambda p, s, z: ops.linear(
                    x, p, s, z, None, "int4", symmetric=True, group_size=128, k=k, validate=False)))[1])
                t_first = None
                for fmt, sym, g in INT8_ACT:
                    _, tiled = ours[(fmt, sym, g)]
                    t, text = cell(Rotating(tiled, lambda c, pr, fmt=fmt, g=g: ops.linear_int8_act(
                        x, c, pr, None, fmt=fmt, group_size=g, n=n, k=k)))
                    t_first = t if t_first is None else t_first
                    row.append(text)
                codes, params = ours[("int4", True, 128)][1][0]
                gbs = (codes.numel() + params.numel() * 4) / t_first
                row.append(f"{gbs / 1e9:.1f} ({100 * gbs / bw:.0f}%)" if m == 1 else "-")
                rows.append(row)
                print(" | ".join(str(c) for c in row), flush=True)
    print()
    print_table(headers, rows)


if __name__ == "__main__":
    main()
