"""Checks alphaquant's FP8 encoders against torch's casts on every one of the 2^32 float32 bit patterns.

Takes a few minutes on a 2-core CPU; the test suite checks a dense sample of the same space.
Usage: python scripts/exhaustive_fp8_check.py [--chunk-log2 24]
"""
import argparse
import time

import torch

import alphaquant.ops as ops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunk-log2", type=int, default=24)
    args = parser.parse_args()
    chunk = 1 << args.chunk_log2
    start = time.time()
    for fmt, dtype in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        bad = 0
        for base in range(0, 1 << 32, chunk):
            bits = torch.arange(base, base + chunk, dtype=torch.int64)
            x = (bits - (bits >= (1 << 31)).to(torch.int64) * (1 << 32)).to(torch.int32).view(torch.float32)
            ours = ops.encode_float(x, fmt)
            theirs = x.to(dtype).view(torch.uint8)
            mismatch = ours != theirs
            if mismatch.any():
                i = int(mismatch.nonzero()[0])
                bad += int(mismatch.sum())
                print(f"{fmt}: 0x{base + i:08x} -> ours 0x{int(ours[i]):02x}, torch 0x{int(theirs[i]):02x}")
        print(f"{fmt}: {bad} mismatches over 2^32 inputs ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
