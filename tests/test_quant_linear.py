"""QuantLinear: the scheme it carries, and weight scales checked once, when they are loaded."""
import pytest
import torch
from torch import nn

from alphaquant.nn import QuantLinear
from alphaquant.quantizers import INT4Config, INT4Quantizer

SCHEME = {"wq": "int4", "group_size": 32, "aq": "float", "observer": "minmax"}


def _layer(**kw):
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(64, 16), INT4Quantizer(INT4Config(group_size=32, symmetric=False)), **kw)


def test_scheme_is_a_constructor_argument():
    assert _layer().scheme is None
    q = _layer(scheme=SCHEME)
    assert q.scheme == SCHEME
    direct = QuantLinear(64, 16, True, "int4", True, 32, scheme=SCHEME)
    assert direct.scheme == SCHEME


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -2.0, float("inf")])
def test_load_packed_rejects_bad_scales(bad):
    q = _layer()
    packed = q.packed_weight
    packed.scale = packed.scale.clone()
    packed.scale[3, 1] = bad
    fresh = QuantLinear(64, 16, True, "int4", False, 32)
    with pytest.raises(ValueError, match=r"QuantLinear\(64 -> 16\): weight scales must be finite and > 0"):
        fresh.load_packed(packed)


@pytest.mark.parametrize("key,bad", [("weight_scale", float("nan")), ("weight_scale", 0.0),
                                     ("weight_zero_point", float("inf"))])
def test_load_state_dict_rejects_bad_scales(key, bad):
    sd = _layer().state_dict()
    sd[key] = sd[key].clone()
    sd[key][0, 0] = bad
    with pytest.raises(ValueError, match="weight scales must be finite and > 0"):
        QuantLinear(64, 16, True, "int4", False, 32).load_state_dict(sd)


def test_good_state_dict_loads_and_gives_the_same_output():
    q = _layer()
    fresh = QuantLinear(64, 16, True, "int4", False, 32)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), q(x))


def test_scale_dtype_conversion_is_checked():
    q = _layer()
    q.weight_scale[0, 0] = 1e-30  # valid in float32, zero in float16
    with pytest.raises(ValueError, match="weight scales must be finite and > 0"):
        q.half()
    q = _layer()
    q.to("meta")  # nothing to check there, nothing raised
    q.to_empty(device="cpu")  # uninitialized values of the same dtype: checked when loaded
