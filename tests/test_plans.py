"""Plans: every malformed plan gives a PlanError (fuzzed), and a plan that fails leaves the model
as it was."""
import json
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from alphaquant.nn import QuantLinear
from alphaquant.plans import SCHEME_KEYS, PlanError, apply_plan, load_plan


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _linears(model):
    return [type(m) for m in model if isinstance(m, (nn.Linear, QuantLinear))]


# ---------------------------------------------------------------- reading and validating

def test_plan_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "plan.json"
    p.write_bytes(b'{"default": {"wq": "int4\xff"}}')
    with pytest.raises(PlanError, match="not UTF-8"):
        load_plan(p)


def test_plan_file_nested_too_deeply(tmp_path):
    p = tmp_path / "plan.json"
    depth = sys.getrecursionlimit() * 2
    p.write_text("[" * depth + "]" * depth)
    with pytest.raises(PlanError, match="nested too deeply|must be a JSON object"):
        load_plan(p)


def test_plan_file_missing_or_huge(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan"):
        load_plan(tmp_path / "nope.json")
    p = tmp_path / "big.json"
    p.write_text(" " * (2 << 20) + "{}")
    with pytest.raises(PlanError, match="small JSON file"):
        load_plan(p)


@pytest.mark.parametrize("plan,match", [
    ({"default": {"wq": ["int4"]}}, "unknown quantizer"),
    ({"default": {"aq": {"name": "int8"}}}, "unknown quantizer"),
    ({"default": {"group_size": 10**100}}, "group_size must be a positive integer"),
    ({"default": {"group_size": 1.5}}, "group_size must be a positive integer"),
    ({"default": {"granularity": ["per_group"]}}, "granularity must be one of"),
    ({"default": {"dtype": {"x": 1}}}, "dtype must be"),
    ({"default": {"observer": 3}}, "observer must be one of"),
    ({"default": {"skip": "false"}}, "skip must be true or false"),
    ({"name": 3}, "'name' must be a string"),
    ({"default": {"wq": "int4", "zero_opt": True}}, "default: .*zero_opt .*asymmetric"),
    ({"default": {"wq": "int4", "symmetric": False},
      "overrides": [{"pattern": "*", "zero_opt": True, "clip_search": True}]}, r"overrides\[0\]: .*pick one"),
    ({"overrides": [{"pattern": "*", "wq": "fp8", "zero_opt": True}]}, r"overrides\[0\]"),
])
def test_malformed_values_are_plan_errors(plan, match):
    with pytest.raises(PlanError, match=match):
        load_plan(plan)


def test_huge_integer_is_reported_briefly():
    with pytest.raises(PlanError) as e:
        load_plan({"default": {"group_size": 10**5000}})
    assert len(str(e.value)) < 300


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8)
    | st.sampled_from(["int4", "int8", "fp8", "none", "per_group", "per_tensor", "float16", "minmax", "*"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(sorted(SCHEME_KEYS | {"pattern", "default", "overrides", "bogus"})), inner, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["default", "overrides", "name", "description", "extra"]), _json, max_size=4))
def test_fuzzed_plans_validate_or_raise_plan_error(plan):
    try:
        out = load_plan(plan)
    except PlanError:
        return
    json.dumps(out)  # a plan that loads is plain JSON
    apply_plan(_model(), out, quantize_weights=False)  # and builds


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_plan_files_validate_or_raise_plan_error(tmp_path_factory, raw):
    p = tmp_path_factory.mktemp("fuzz") / "plan.json"
    p.write_bytes(raw)
    try:
        load_plan(p)
    except PlanError:
        pass


# ---------------------------------------------------------------- all or nothing

def test_non_finite_weight_is_found_before_any_layer_changes():
    model = _model()
    with torch.no_grad():
        model[2].weight[3, 4] = float("nan")
    with pytest.raises(PlanError, match=r"layer 2: the weight holds NaN or Inf"):
        apply_plan(model, {"default": {"wq": "int4", "group_size": 8}})
    assert _linears(model) == [nn.Linear, nn.Linear]


def test_missing_calibration_changes_nothing():
    model = _model()
    with pytest.raises(PlanError, match="no calibration_batches"):
        apply_plan(model, {"default": {"wq": "int8", "aq": "int8", "act_static": True}})
    assert _linears(model) == [nn.Linear, nn.Linear]


def test_failure_during_calibration_restores_the_model():
    model = _model()
    x = torch.randn(4, 16)
    before = model(x)

    def broken_forward(m, batch):
        raise RuntimeError("calibration blew up")

    with pytest.raises(RuntimeError, match="blew up"):
        apply_plan(model, {"default": {"wq": "int8", "aq": "int8", "act_static": True}},
                   calibration_batches=[x], forward_fn=broken_forward)
    assert _linears(model) == [nn.Linear, nn.Linear]
    assert torch.equal(model(x), before)


def test_failure_midway_restores_the_model(monkeypatch):
    model = _model()
    calls = []
    real = QuantLinear.from_packed  # what apply_plan builds every layer with

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(QuantLinear, "from_packed", fail_second)
    with pytest.raises(KeyboardInterrupt):
        apply_plan(model, {"default": {"wq": "int4", "group_size": 8}})
    assert _linears(model) == [nn.Linear, nn.Linear]


def test_fp8_holds_non_finite_weights():
    model = _model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    apply_plan(model, {"default": {"wq": "fp8", "group_size": 8}})
    assert _linears(model) == [QuantLinear, QuantLinear]


def test_strict_makes_unmatched_patterns_an_error():
    model = _model()
    plan = {"overrides": [{"pattern": "model.layers.*.attention.*", "wq": "int4"}]}
    with pytest.raises(PlanError, match=r"match no linear layer.*attention"):
        apply_plan(model, plan, strict=True)
    assert _linears(model) == [nn.Linear, nn.Linear]


@pytest.mark.parametrize("aq", [None, "none", "float"])
def test_report_names_float_activations_plainly(aq):
    report = apply_plan(_model(), {"default": {"wq": "int4", "aq": aq, "group_size": 8}})
    assert all(r.scheme == "wint4/g8 afloat" for r in report.layers)
