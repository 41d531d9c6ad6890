"""A self-check a user can run: every format against the pure-PyTorch reference, bit for bit,
plus the FP8 casts of torch and the FP4/FP6 casts of ml_dtypes. Exits non-zero on a failure.
(The full suite is `python -m pytest tests`.)"""
import sys

import torch

from alphaquant import ops, reference as ref
from alphaquant.formats import CODEBOOK_FORMATS, FLOAT_FORMATS, INT_FORMATS


def main() -> int:
    torch.manual_seed(0)
    failures = 0
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    schemes = [(f, s) for f in INT_FORMATS for s in (True, False) if not (f == "int1" and s)]
    schemes += [(f, True) for f in FLOAT_FORMATS + CODEBOOK_FORMATS]
    for dev in devices:
        for fmt, sym in schemes:
            for group_size in (32, 7, 0, -1):
                x = torch.randn(9, 131) * 3
                got = ops.quantize(x.to(dev), fmt, symmetric=sym, group_size=group_size)
                want = ref.quantize(x, fmt, sym, group_size)
                ok = all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
                if not ok:
                    failures += 1
                    print(f"FAIL {dev} {fmt} symmetric={sym} group_size={group_size}")
        x = torch.randn(1 << 16) * 100
        x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e6])
        for fmt, dt in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
            if not torch.equal(ops.encode_float(x.to(dev), fmt).cpu(), x.to(dt).view(torch.uint8)):
                failures += 1
                print(f"FAIL {dev} {fmt} differs from torch's cast")
        try:
            import ml_dtypes
            import numpy as np

            xf = x[4:]
            for fmt, dt in (("fp4_e2m1", ml_dtypes.float4_e2m1fn), ("fp6_e2m3", ml_dtypes.float6_e2m3fn),
                            ("fp6_e3m2", ml_dtypes.float6_e3m2fn)):
                if not np.array_equal(ops.encode_float(xf.to(dev), fmt).cpu().numpy(),
                                      xf.numpy().astype(dt).view(np.uint8)):
                    failures += 1
                    print(f"FAIL {dev} {fmt} differs from ml_dtypes")
        except ImportError:
            print("ml_dtypes not installed: FP4/FP6 cast check skipped")
    print("all checks passed" if failures == 0 else f"{failures} checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
