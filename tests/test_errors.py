"""Bad input gives clear exceptions, never a crash or a silent wrong answer."""
import pytest
import torch

from alphaquant import ops
from alphaquant._native import has_cuda_kernels
from conftest import CUDA_OK, cuda_only


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'int9'.*allowed"):
        ops.quantize(torch.randn(4, 8), "int9")


def test_float_format_cannot_be_asymmetric():
    with pytest.raises(ValueError, match="symmetric by definition"):
        ops.quantize(torch.randn(4, 8), "fp8_e4m3", symmetric=False)


def test_wrong_dtype(device):
    with pytest.raises(TypeError, match="float32, float16 or bfloat16; got Int"):
        ops.quantize(torch.ones(4, 8, dtype=torch.int32, device=device), "int4")
    with pytest.raises(TypeError, match="codes must be uint8"):
        ops.pack(torch.ones(4, 8, dtype=torch.int32, device=device), 4)


def test_empty_and_scalar(device):
    with pytest.raises(ValueError, match="empty"):
        ops.quantize(torch.empty(0, 8, device=device), "int4")
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.quantize(torch.tensor(1.0, device=device), "int4")


def test_bad_group_size():
    with pytest.raises(ValueError, match="group_size must be > 0"):
        ops.quantize(torch.randn(4, 8), "int4", group_size=-2)


def test_bits_out_of_range():
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        ops.pack(torch.zeros(4, 8, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        ops.pack(torch.full((4, 8), 4, dtype=torch.uint8), 2)


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp4_e2m1", "fp6_e2m3", "nf4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_rejected_where_format_cannot_hold_it(fmt, bad, device):
    x = torch.randn(4, 8, device=device)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.quantize(x, fmt, group_size=4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.fake_quantize(x, fmt, group_size=-1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.quantize(x, fmt, group_size=4, scale=torch.ones(4, 2, device=device))


def test_scale_of_wrong_shape(device):
    x = torch.randn(4, 96, device=device)
    with pytest.raises(ValueError, match=r"scale has shape \[4, 2\]; expected \[4, 3\]"):
        ops.quantize(x, "int4", group_size=32, scale=torch.ones(4, 2, device=device))


def test_bad_static_scale_values():
    x = torch.randn(4, 8)
    for s in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="finite and > 0"):
            ops.quantize(x, "int4", group_size=0, scale=torch.full((4, 1), s))


def test_zero_point_rules():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="need zero_point"):
        ops.quantize(x, "int4", symmetric=False, group_size=0, scale=torch.ones(4, 1))
    with pytest.raises(ValueError, match="only used by asymmetric"):
        ops.quantize(x, "int4", group_size=0, scale=torch.ones(4, 1), zero_point=torch.zeros(4, 1))


def test_dequantize_shape_mismatch():
    p, s, _ = ops.quantize(torch.randn(4, 32), "int4", group_size=16)
    with pytest.raises(ValueError, match="packed rows hold 16 bytes, but 40 values"):
        ops.dequantize(p, s, None, "int4", group_size=16, k=40)
    with pytest.raises(TypeError, match="output dtype"):
        ops.dequantize(p, s, None, "int4", group_size=16, k=32, dtype=torch.int32)


def test_decode_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="not a fp4_e2m1 code"):
        ops.decode_float(torch.tensor([16], dtype=torch.uint8), "fp4_e2m1")
    with pytest.raises(ValueError, match="not a float format"):
        ops.decode_float(torch.tensor([1], dtype=torch.uint8), "int4")


def test_linear_shape_errors():
    p, s, _ = ops.quantize(torch.randn(8, 32), "int4", group_size=16)
    with pytest.raises(ValueError, match="last dimension k=32"):
        ops.linear(torch.randn(2, 31), p, s, None, None, "int4", group_size=16, k=32)
    with pytest.raises(ValueError, match=r"bias must have shape \[8\]"):
        ops.linear(torch.randn(2, 32), p, s, None, torch.zeros(7), "int4", group_size=16, k=32)


@cuda_only
def test_device_mismatch_is_reported():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="scale is on cpu but x is on cuda:0; .*same device"):
        ops.quantize(x, "int4", group_size=0, scale=torch.ones(4, 1))
    p, s, _ = ops.quantize(x, "int4", group_size=0)
    with pytest.raises(ValueError, match="packed is on cuda:0 but x is on cpu"):
        ops.linear(torch.randn(2, 8), p, s, None, None, "int4", group_size=0, k=8)


def test_int1_symmetric_is_rejected():
    with pytest.raises(ValueError, match="int1 has no symmetric form"):
        ops.quantize(torch.randn(4, 8), "int1")


@pytest.mark.cuda
@pytest.mark.skipif(has_cuda_kernels() or not torch.cuda.is_available(),
                    reason="only meaningful for a CPU-only build on a machine with a GPU")
def test_cuda_tensors_without_cuda_kernels_get_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        ops.quantize(torch.randn(4, 8, device="cuda"), "int4")
    # mixed devices are reported as such, as a CUDA build would
    with pytest.raises(ValueError, match="scale is on cpu but x is on cuda:0"):
        ops.quantize(torch.randn(4, 8, device="cuda"), "int4", group_size=0, scale=torch.ones(4, 1))


def test_cuda_only_tests_carry_the_cuda_marker():
    @cuda_only
    def needs_cuda():
        pass

    marks = {m.name: m for m in needs_cuda.pytestmark}
    assert "cuda" in marks and "skipif" in marks  # `-m cuda` selects it; without CUDA it is skipped
    assert marks["skipif"].args == (not CUDA_OK,)
