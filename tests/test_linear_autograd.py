"""Gradients through the low-bit linear op and QuantLinear: d x = grad @ W, d bias = grad summed."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alphaquant import ops
from alphaquant.nn import QuantLinear
from alphaquant.quantizers import INT4Config, INT4Quantizer, INT8Config, INT8Quantizer


def _weight(fmt, sym, group_size, n=12, k=40, device="cpu"):
    torch.manual_seed(0)
    p, s, z = ops.quantize(torch.randn(n, k, device=device), fmt, symmetric=sym, group_size=group_size)
    z = z if z.numel() else None
    w = ops.dequantize(p, s, z, fmt, symmetric=sym, group_size=group_size, k=k)
    return p, s, z, w


def test_gradcheck_float32():
    # float64 is not a dtype the op takes: float32 with a step and tolerances to match. The op is
    # linear in x and bias, so central differences are exact up to float32 rounding.
    p, s, z, _ = _weight("int4", False, 16)
    x = torch.randn(3, 40, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)

    def f(x, bias):
        return ops.linear(x, p, s, z, bias, "int4", symmetric=False, group_size=16, k=40)

    with pytest.warns(UserWarning, match="not a double precision"):
        assert torch.autograd.gradcheck(f, (x, bias), eps=1e-2, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("fmt,sym,group_size", [("int4", True, 16), ("int3", False, 10), ("fp8_e4m3", True, 0),
                                                ("fp4_e2m1", True, -1), ("nf4", True, 16)])
@pytest.mark.parametrize("shape", [(1, 40), (5, 40), (2, 20, 40)])  # decode path and GEMM path (m > 16)
def test_gradients_match_float_linear(fmt, sym, group_size, shape, device):
    p, s, z, w = _weight(fmt, sym, group_size, device=device)
    x = torch.randn(shape, device=device, requires_grad=True)
    bias = torch.randn(12, device=device, requires_grad=True)
    g = torch.randn(shape[:-1] + (12,), device=device)
    ops.linear(x, p, s, z, bias, fmt, symmetric=sym, group_size=group_size, k=40).backward(g)
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    F.linear(x2, w, b2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients(dtype, device):
    p, s, z, w = _weight("int4", True, 16, device=device)
    x = torch.randn(4, 40, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(12, device=device, requires_grad=True)  # float32 bias with half activations
    y = ops.linear(x, p, s, z, bias, "int4", group_size=16, k=40)
    g = torch.randn_like(y)
    y.backward(g)
    assert x.grad.dtype == dtype and bias.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.float(), g.float() @ w, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(bias.grad, g.float().sum(0), rtol=2e-2, atol=2e-2)


def test_only_what_requires_grad_gets_one():
    p, s, z, _ = _weight("int4", True, 16)
    bias = torch.randn(12, requires_grad=True)
    x = torch.randn(2, 40)
    ops.linear(x, p, s, z, bias, "int4", group_size=16, k=40).sum().backward()
    assert x.grad is None and bias.grad is not None
    x.requires_grad_()
    ops.linear(x, p, s, z, None, "int4", group_size=16, k=40).sum().backward()
    assert x.grad is not None


class LoraQuantLinear(nn.Module):
    """A frozen QuantLinear plus a trainable low-rank adapter: y = q(x) + B(A(x))."""

    def __init__(self, q: QuantLinear, rank: int = 4):
        super().__init__()
        self.q = q
        self.a = nn.Linear(q.in_features, rank, bias=False)
        self.b = nn.Linear(rank, q.out_features, bias=False)
        nn.init.normal_(self.b.weight)

    def forward(self, x):
        return self.q(x) + self.b(self.a(x))


def _lora(act_quantizer=None):
    torch.manual_seed(1)
    q = QuantLinear.from_linear(nn.Linear(64, 24), INT4Quantizer(INT4Config(group_size=32)), act_quantizer)
    return LoraQuantLinear(q)


def _reference_grads(model, x, g):
    """The same gradients with the dequantized weight in a plain float linear layer."""
    w = model.q.dequantized_weight()
    x = x.detach().clone().requires_grad_()
    a, b = model.a.weight.detach().clone().requires_grad_(), model.b.weight.detach().clone().requires_grad_()
    (F.linear(x, w, model.q.bias) + F.linear(F.linear(x, a), b)).backward(g)
    return x.grad, a.grad, b.grad


@pytest.mark.parametrize("m", [3, 33])
def test_quant_linear_passes_gradients_to_input_and_adapter(m):
    model = _lora()
    x = torch.randn(m, 64, requires_grad=True)
    g = torch.randn(m, 24)
    model(x).backward(g)
    assert x.grad is not None and model.a.weight.grad is not None and model.b.weight.grad is not None
    want = _reference_grads(model, x, g)
    for got, exp in zip((x.grad, model.a.weight.grad, model.b.weight.grad), want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)


def test_quant_linear_with_quantized_activations_has_input_gradient():
    # fake_quantize of the activations passes the gradient straight through
    model = _lora(INT8Quantizer(INT8Config(granularity="per_channel")))
    x = torch.randn(4, 64, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_quant_linear_training_step_compiles_fullgraph():
    model = _lora()
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, 24)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).backward(g)
    got = (x.grad.clone(), model.a.weight.grad.clone(), model.b.weight.grad.clone())
    for got_t, exp in zip(got, _reference_grads(model, x, g)):
        torch.testing.assert_close(got_t, exp, rtol=1e-4, atol=1e-4)
