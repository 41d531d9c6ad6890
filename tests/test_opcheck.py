"""torch.library.opcheck on every op, and a guard that every op has samples and a fake kernel."""
import pytest
import torch

import alphaquant.ops  # noqa: F401
from conftest import DEVICES


def _w(device):
    w = torch.randn(24, 40, device=device)
    return torch.ops.alphaquant.quantize(w, "int4", False, 16, None, None, False, 0)


def samples(device):
    x = torch.randn(6, 40, device=device)
    codes = torch.randint(0, 8, (5, 13), dtype=torch.uint8, device=device)
    packed, s, z = _w(device)
    p8, s8, _ = torch.ops.alphaquant.quantize(torch.randn(24, 40, device=device), "fp8_e4m3", True, 0, None, None,
                                              False, 0)
    pn, sn, _ = torch.ops.alphaquant.quantize(torch.randn(24, 40, device=device), "nf4", True, 16, None, None,
                                              False, 0)
    yield "pack", (codes, 3)
    yield "unpack", (torch.ops.alphaquant.pack(codes, 3), 3, 13)
    yield "encode_float", (x, "fp8_e5m2")
    yield "encode_float", (x.bfloat16(), "fp4_e2m1")
    yield "decode_float", (torch.randint(0, 64, (7,), dtype=torch.uint8, device=device), "fp6_e3m2", torch.bfloat16)
    yield "encode_float", (x.half(), "nf4")
    yield "decode_float", (torch.randint(0, 16, (3, 7), dtype=torch.uint8, device=device), "nf4", torch.float32)
    yield "quantize", (x, "int4", True, 16, None, None, False, 0)
    yield "quantize", (x.half(), "int6", False, 0, None, None, True, 5)
    yield "quantize", (x, "fp8_e4m3", True, -1, None, None, False, 0)
    yield "quantize", (x.bfloat16(), "nf4", True, 10, None, None, True, 11)
    yield "quantize", (x, "nf4", True, 0, torch.ones(6, 1, device=device), None, False, 0)
    yield "quantize", (x, "int8", False, 16, torch.ones(6, 3, device=device), torch.zeros(6, 3, device=device),
                       False, 0)
    yield "dequantize", (packed, s, z, "int4", False, 16, 40, torch.float16)
    yield "dequantize", (p8, s8, None, "fp8_e4m3", True, 0, 40, torch.bfloat16, False)
    yield "dequantize", (pn, sn, None, "nf4", True, 16, 40, torch.float32)
    yield "fake_quantize", (x.requires_grad_(), "int4", True, 16, None, None, False, 0)
    yield "fake_quantize", (x.detach().bfloat16(), "fp4_e2m1", True, 32, None, None, True, 3)
    yield "fake_quantize", (x.detach().requires_grad_(), "nf4", True, -1, None, None, False, 0)
    yield "linear", (torch.randn(3, 40, device=device), packed, s, z, torch.randn(24, device=device), "int4", False,
                     16, 40)
    yield "linear", (torch.randn(2, 5, 40, device=device).bfloat16(), p8, s8, None, None, "fp8_e4m3", True, 0, 40)
    yield "linear", (torch.randn(3, 40, device=device, requires_grad=True), pn, sn, None,
                     torch.randn(24, device=device), "nf4", True, 16, 40)
    yield "linear", (torch.randn(18, 40, device=device), pn, sn, None, None, "nf4", True, 16, 40, False)
    # learned code books: per tensor in float16, per row in float32; decode, vectorized and GEMM paths
    cb = torch.linspace(-1, 1, 16, device=device).half()
    cb_rows = torch.randn(24, 16, device=device).sort(-1).values
    yield "dequantize_codebook", (pn, sn, cb, 16, 40, torch.bfloat16)
    yield "dequantize_codebook", (pn, sn, cb_rows, 16, 40, torch.float32, False)
    yield "linear_codebook", (torch.randn(3, 40, device=device, requires_grad=True), pn, sn, cb_rows,
                              torch.randn(24, device=device, requires_grad=True), 16, 40)
    yield "linear_codebook", (torch.randn(2, 9, 40, device=device).half(), pn, sn, cb, None, 16, 40, False)
    p64, s64, _ = torch.ops.alphaquant.quantize(torch.randn(8, 64, device=device), "nf4", True, -1, None, None,
                                                False, 0)
    yield "linear_codebook", (torch.randn(5, 64, device=device), p64, s64, cb, None, -1, 64)
    # embedding lookups: any index shape, int64 and int32, per group / channel / tensor, code books
    idx = torch.randint(0, 24, (3, 5), device=device)
    yield "embedding", (idx, packed, s, z, "int4", False, 16, 40, torch.float32)
    yield "embedding", (idx.int().flatten(), p8, s8, None, "fp8_e4m3", True, 0, 40, torch.bfloat16, False)
    p_t, s_t, _ = torch.ops.alphaquant.quantize(torch.randn(24, 40, device=device), "int2", True, -1, None, None,
                                                False, 0)
    yield "embedding", (idx[0], p_t, s_t, None, "int2", True, -1, 40, torch.float16)
    yield "embedding_codebook", (idx, pn, sn, cb_rows, 16, 40, torch.float32)
    yield "embedding_codebook", (idx[:, 0], pn, sn, cb, 16, 40, torch.bfloat16, False)
    # one-byte zero points (uint8 codes on the zero point grid)
    zb = torch.randint(0, 256, tuple(z.shape), dtype=torch.uint8, device=device)
    yield "quantize", (x.detach(), "int4", False, 16, torch.ones(6, 3, device=device), zb[:6], False, 0)
    yield "dequantize", (packed, s, zb, "int4", False, 16, 40, torch.bfloat16)
    yield "linear", (torch.randn(3, 40, device=device, requires_grad=True), packed, s, zb, None, "int4", False,
                     16, 40)
    yield "embedding", (idx, packed, s.half(), zb, "int4", False, 16, 40, torch.float32)
    # the error of a quantized tensor against its source, in one pass
    xw = torch.randn(24, 40, device=device)
    yield "quantization_error", (xw, packed, s, z, "int4", False, 16)
    yield "quantization_error", (xw.bfloat16(), packed, s, zb, "int4", False, 16)
    yield "quantization_error", (xw.half(), p8, s8, None, "fp8_e4m3", True, 0)
    # MX block formats: E8M0 scale bytes, a short last block (k = 40)
    pm, sm, _ = torch.ops.alphaquant.quantize(xw, "mxfp4_e2m1", True, 32, None, None, False, 0)
    yield "quantize", (x.detach().bfloat16(), "mxfp6_e3m2", True, 32, None, None, True, 7)
    yield "quantize", (x.detach(), "mxint8", True, 32, torch.full((6, 2), 120, dtype=torch.uint8, device=device),
                       None, False, 0)
    yield "fake_quantize", (x.detach().requires_grad_(), "mxfp8_e5m2", True, 32, None, None, False, 0)
    yield "dequantize", (pm, sm, None, "mxfp4_e2m1", True, 32, 40, torch.bfloat16)
    yield "linear", (torch.randn(3, 40, device=device, requires_grad=True), pm, sm, None, None, "mxfp4_e2m1", True,
                     32, 40)
    yield "linear", (torch.randn(20, 40, device=device), pm, sm, None, None, "mxfp4_e2m1", True, 32, 40)
    yield "embedding", (idx, pm, sm, None, "mxfp4_e2m1", True, 32, 40, torch.float32)
    yield "quantization_error", (xw, pm, sm, None, "mxfp4_e2m1", True, 32)
    # NVFP4: E4M3 scale bytes per 16 values and the global scale as zero_point (k = 40: a short block)
    pv, sv, gv = torch.ops.alphaquant.quantize(xw, "nvfp4", True, 16, None, None, False, 0)
    yield "quantize", (x.detach().bfloat16(), "nvfp4", True, 16, None, None, True, 3)
    yield "quantize", (x.detach(), "nvfp4", True, 16, None, torch.tensor([3.5], device=device), False, 0)
    yield "fake_quantize", (x.detach().requires_grad_(), "nvfp4", True, 16, None, None, False, 0)
    yield "dequantize", (pv, sv, gv, "nvfp4", True, 16, 40, torch.bfloat16)
    yield "linear", (torch.randn(3, 40, device=device, requires_grad=True), pv, sv, gv, None, "nvfp4", True, 16, 40)
    yield "embedding", (idx, pv, sv, gv, "nvfp4", True, 16, 40, torch.float32)
    yield "quantization_error", (xw, pv, sv, gv, "nvfp4", True, 16)
    # the int8-activation path (CPU only): its layout op and linear (k = 40: a short last block)
    if device == "cpu":
        p32, s32, z32 = torch.ops.alphaquant.quantize(xw, "int4", False, 32, None, None, False, 0)
        yield "int8_act_layout", (p32, s32, z32, "int4", False, 32, 40)
        yield "int8_act_layout", (p8[:, :40], s8.new_ones(24, 1), None, "int8", True, 0, 40)
        codes, params = torch.ops.alphaquant.int8_act_layout(p32, s32, z32, "int4", False, 32, 40)
        yield "linear_int8_act", (torch.randn(3, 40), codes, params, torch.randn(24), "int4", 32, 24, 40)
        yield "linear_int8_act", (torch.randn(2, 9, 40).bfloat16(), codes, params, None, "int4", 32, 24, 40)
        cf, pf = torch.ops.alphaquant.int8_act_layout(pm, sm, None, "mxfp4_e2m1", True, 32, 40)
        yield "int8_act_layout", (pm, sm, None, "mxfp4_e2m1", True, 32, 40)
        yield "linear_int8_act", (torch.randn(2, 40), cf, pf, None, "mxfp4_e2m1", 32, 24, 40)
        yield "int8_act_unlayout", (codes, "int4", 24, 40)
        yield "int8_act_unlayout", (cf, "mxfp4_e2m1", 24, 40)
    # with gradients (x and bias) and without the scale check
    yield "linear", (torch.randn(4, 40, device=device, requires_grad=True), packed, s, z,
                     torch.randn(24, device=device, requires_grad=True), "int4", False, 16, 40, False)
    yield "linear", (torch.randn(20, 40, device=device, requires_grad=True), p8, s8, None, None, "fp8_e4m3", True, 0,
                     40)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_sample(device):
    for name, args in samples(device):
        torch.library.opcheck(getattr(torch.ops.alphaquant, name).default, args)


def test_every_op_has_samples_and_a_fake_kernel():
    ops = {name for name in dir(torch.ops.alphaquant) if not name.startswith("_")}
    ops = {n for n in ops if isinstance(getattr(torch.ops.alphaquant, n), torch._ops.OpOverloadPacket)}
    sampled = {name for name, _ in samples("cpu")}
    assert ops == sampled, f"ops without samples: {ops - sampled}; samples of unknown ops: {sampled - ops}"
    for name in ops:
        qualname = f"alphaquant::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta") or \
            torch._library.simple_registry.singleton.find(qualname).fake_impl.kernel is not None, name
