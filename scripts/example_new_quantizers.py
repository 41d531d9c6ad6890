"""Usage examples of the quantizer API, runnable: quantize a random tensor to every format and print error and bytes."""
import torch

from alphaquant.quantizers import (CodebookConfig, CodebookQuantizer, FP4Config, FP4Quantizer, FP8Config, FP8Quantizer,
                                   INT2Config, INT2Quantizer, INT4Config, INT4Quantizer, INT6Config, INT6Quantizer,
                                   INT8Config, INT8Quantizer, MinMaxObserver, NF4Config, NF4Quantizer)
from alphaquant.utils.replacement import create_quantizer_from_scheme


def main() -> None:
    torch.manual_seed(0)
    weights = torch.randn(1024, 1024)
    activations = torch.randn(16, 1024)
    print(f"random weight {tuple(weights.shape)}: {weights.numel() * 4} bytes in float32\n")
    print(f"{'quantizer':<34} {'bytes':>9} {'bits/value':>10} {'rel. error':>10} {'SQNR dB':>8}")
    quantizers = [
        INT8Quantizer(INT8Config(symmetric=True, group_size=128)),
        INT6Quantizer(INT6Config(symmetric=True, group_size=128)),
        INT4Quantizer(INT4Config(symmetric=False, group_size=128)),
        INT2Quantizer(INT2Config(symmetric=False, group_size=32)),
        FP8Quantizer(FP8Config(format="e4m3", group_size=128)),
        FP8Quantizer(FP8Config(format="e5m2", group_size=128)),
        FP4Quantizer(FP4Config(format="e2m1", group_size=32)),
        NF4Quantizer(NF4Config(group_size=64)),
        CodebookQuantizer(CodebookConfig(group_size=64)),  # lut4: 16 values fitted to this weight
    ]
    for q in quantizers:
        packed = q.quantize_weight(weights)
        err = (packed.dequantize(torch.float32) - weights).norm() / weights.norm()
        name = f"{type(q).__name__}({q.fmt}{'' if q.symmetric else ' asym'})"
        print(f"{name:<34} {packed.nbytes:>9} {packed.bits_per_value:>10.3f} {err.item():>10.4f} "
              f"{-20 * torch.log10(err).item():>8.2f}")

    print("\nstatic quantization with an observer:")
    quantizer = INT8Quantizer(INT8Config(symmetric=True))
    observer = MinMaxObserver()
    quantizer.attach_observer(observer)
    for _ in range(8):
        observer.observe(torch.randn(16, 1024))
    quantizer.calibrate_finish()
    quantized = quantizer.quantize_activation(activations)
    print(f"  static scales {tuple(quantizer.static_scale.shape)}, activation error "
          f"{((quantized.float() - activations).norm() / activations.norm()).item():.4f}")

    (WQ, WCfg), (AQ, ACfg) = create_quantizer_from_scheme({"wq": "int8", "aq": "fp8"}, "bfloat16")
    print(f"\nscheme {{'wq': 'int8', 'aq': 'fp8'}} -> {WQ(WCfg())} and {AQ(ACfg())}")


if __name__ == "__main__":
    main()
