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
    monkeypatch.setenv("ALPHAQUANT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="ALPHAQUANT_CPU_ISA must be portable, avx2 or avx512_vnni"):
        ops.cpu_isa()
    packed, scale = _weight(16, 32)
    codes, params = ops.int8_act_layout(packed, scale, None, "int4", symmetric=True, group_size=32, k=32)
    with pytest.raises(ValueError, match="ALPHAQUANT_CPU_ISA"):
        ops.linear_int8_act(torch.randn(1, 32), codes, params, None, fmt="int4", group_size=32, n=16, k=32)


def test_a_build_for_avx2_refuses_a_cpu_without_it():
    from alphaquant import _native

    _native.check_cpu_runs_build("avx2", {"avx2", "fma", "f16c", "sse4_2"})
    _native.check_cpu_runs_build("baseline", {"sse2"})
    _native.check_cpu_runs_build("avx2", None)  # flags unknown: nothing to say
    with pytest.raises(ImportError, match="lacks avx2, f16c, fma; rebuild it here with ALPHAQUANT_NO_AVX2=1"):
        _native.check_cpu_runs_build("avx2", {"sse2", "sse4_2"})
