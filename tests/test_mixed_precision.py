"""The budget planner: exact budgets, better predicted loss than one format everywhere, valid plans."""
import random

import pytest
import torch

from alphaquant.algorithms import mixed_precision as mp
from alphaquant.plans import apply_plan, load_plan


def synthetic(n_layers=12, seed=0):
    rng = random.Random(seed)
    cands = {"a": {"wq": "int2"}, "b": {"wq": "int4"}, "c": {"wq": "int8"}}
    sens = mp.Sensitivity([f"l{i}" for i in range(n_layers)], {}, cands)
    for n in sens.layers:
        numel = rng.choice([1000, 4000, 16000])
        sens.numel[n] = numel
        scale = rng.uniform(0.1, 10)
        sens.cost[n] = {"a": scale * 16, "b": scale, "c": scale / 16}
        sens.size[n] = {"a": numel // 4 + 7, "b": numel // 2 + 7, "c": numel + 7}
    return sens


def brute_force(sens, budget):
    import itertools

    best = None
    for combo in itertools.product(sens.candidates, repeat=len(sens.layers)):
        a = dict(zip(sens.layers, combo))
        if sens.bits(a) <= budget and (best is None or sens.predicted_loss(a) < sens.predicted_loss(best)):
            best = a
    return best


@pytest.mark.parametrize("budget", [2.2, 3.0, 4.0, 5.5, 7.9])
def test_budget_is_never_exceeded_and_near_optimal(budget):
    sens = synthetic(9, seed=int(budget * 10))
    a = mp.solve_budget(sens, budget)
    assert sens.bits(a) <= budget
    opt = brute_force(sens, budget)
    assert sens.predicted_loss(a) <= 1.01 * sens.predicted_loss(opt)


def test_budget_below_the_smallest_mix_is_refused():
    with pytest.raises(ValueError, match="below the smallest candidate mix"):
        mp.solve_budget(synthetic(), 1.0)


def test_planner_on_a_model_honors_the_budget_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64),
                                torch.nn.GELU(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        model[2].weight.mul_(5)  # one layer matters more
    data = [torch.randn(32, 64) for _ in range(4)]
    targets = [torch.randint(0, 10, (32,)) for _ in range(4)]
    batches = list(zip(data, targets))
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    names = ["0", "2", "4"]
    sens = mp.measure_sensitivity(model, names, batches, loss)
    assert all(p.grad is None for p in model.parameters())
    for budget in (3.2, 4.5, 6.0):
        a = mp.solve_budget(sens, budget)
        plan = load_plan(mp.assignment_plan(a, sens.candidates, "test"))
        m = __import__("copy").deepcopy(model)
        report = apply_plan(m, plan)
        bits = 8.0 * report.bytes_after / sum(sens.numel.values())
        assert bits == pytest.approx(sens.bits(a)) and bits <= budget
        # the mix is predicted at least as good as the best single candidate that fits
        fits = [c for c in sens.candidates if sens.bits({n: c for n in names}) <= budget]
        if fits:
            assert sens.predicted_loss(a) <= min(sens.predicted_loss({n: c for n in names}) for c in fits) + 1e-12


def test_layer_bytes_counts_codes_scales_and_zero_points():
    scheme = {"wq": "int4", "group_size": 64, "symmetric": False, "scale_dtype": "float16"}
    assert mp.layer_bytes(10, 130, scheme) == 10 * 65 + 10 * 3 * 2 * 2
