"""Which instruction set the CPU kernels use: chosen at run time by CPUID (ALPHAQUANT_CPU_ISA lowers
it), and a build for AVX2 refused with a message on a CPU without it."""
import pytest
import torch

from alphaquant import ops

ISAS = ["portable", "avx2", "avx512_vnni"]


def _weight(n, k):
    packed, scale, _ = ops.quantize(torch.randn(n, k), "int4", symmetric=True, group_size=32)
    return packed, scale


def test_cpu_isa_follows_the_environment(monkeypatch):
    monkeypatch.delenv("ALPHAQUANT_CPU_ISA", raising=False)
    best = ops.cpu_isa()
    assert best in ISAS
    monkeypatch.setenv("ALPHAQUANT_CPU_ISA", "portable")
    assert ops.cpu_isa() == "portable"
    monkeypatch.setenv("ALPHAQUANT_CPU_ISA", "avx512_vnni")
    assert ops.cpu_isa() == best or ISAS.index(best) < ISAS.index("avx512_vnni")
    packed, scale = _weight(16, 32)
    codes, params = ops.int8_act_layout(packed, scale, None, "int4", symmetric=True, group_size=32, k=32)
    monkeypatch.setenv("ALPHAQUANT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="ALPHAQUANT_CPU_ISA must be portable, avx2 or avx512_vnni"):
        ops.cpu_isa()
    with pytest.raises(ValueError, match="ALPHAQUANT_CPU_ISA"):
        ops.linear_int8_act(torch.randn(1, 32), codes, params, None, fmt="int4", group_size=32, n=16, k=32)
    with pytest.raises(ValueError, match="ALPHAQUANT_CPU_ISA"):  # the kernels compiled in two variants too
        ops.quantize(torch.randn(4, 32), "int4", symmetric=True, group_size=32)


def test_a_build_for_avx2_refuses_a_cpu_without_it():
    from alphaquant import _native

    _native.check_cpu_runs_build("avx2", {"avx2", "fma", "f16c", "sse4_2"})
    _native.check_cpu_runs_build("baseline", {"sse2"})
    _native.check_cpu_runs_build("avx2", None)  # flags unknown: nothing to say
    with pytest.raises(ImportError, match="lacks avx2, f16c, fma; rebuild it here with ALPHAQUANT_NO_AVX2=1"):
        _native.check_cpu_runs_build("avx2", {"sse2", "sse4_2"})


def test_one_build_runs_anywhere():
    """setup.py compiles for the x86-64 baseline; only kernels chosen by CPUID use more."""
    from alphaquant import _build_isa

    assert _build_isa.BUILT_FOR == "baseline"


@pytest.mark.parametrize("fmt,symmetric,group_size", [("int4", False, 128), ("fp8_e4m3", True, 0),
                                                     ("fp4_e2m1", True, 32), ("int6", False, 96), ("nf4", True, 64)])
def test_kernel_variants_agree(fmt, symmetric, group_size, monkeypatch):
    """The baseline and AVX2 variants of the kernels (csrc/cpu/cpu_variant.h): the same codes,
    scales and decoded values bit for bit (the formats define them), linear within float rounding."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(40, 200, generator=g), torch.randn(3, 200, generator=g)
    results = []
    for isa in ("portable", None):
        if isa is None:
            monkeypatch.delenv("ALPHAQUANT_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ALPHAQUANT_CPU_ISA", isa)
        p, s, z = ops.quantize(w.to(torch.bfloat16), fmt, symmetric=symmetric, group_size=group_size)
        z = None if symmetric else z
        deq = ops.dequantize(p, s, z, fmt, symmetric=symmetric, group_size=group_size, k=200, dtype=torch.bfloat16)
        err = ops.quantization_error(w, p, s, z, fmt, symmetric=symmetric, group_size=group_size)
        y = ops.linear(x, p, s, z, None, fmt, symmetric=symmetric, group_size=group_size, k=200)
        results.append((p, s, z, deq, err, y))
    (p0, s0, z0, d0, e0, y0), (p1, s1, z1, d1, e1, y1) = results
    assert torch.equal(p0, p1) and torch.equal(s0, s1) and (z0 is None or torch.equal(z0, z1))
    assert torch.equal(d0.view(torch.int16), d1.view(torch.int16))
    torch.testing.assert_close(e0, e1, rtol=1e-5, atol=0)
    torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-5)
