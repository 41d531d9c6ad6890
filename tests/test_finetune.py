"""Scale fine-tuning (alphaquant/algorithms/finetune.py): distillation from the float model trains
the weight scales only; codes, layout and bits stay as the plan chose them."""
import copy

import pytest
import torch

from alphaquant.nn import QuantLinear
from alphaquant.plans import PlanError, apply_plan, load_plan

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, 32), generator=g) for _ in range(n)]


def kl_to(model, ref, data):
    with torch.no_grad():
        total = 0.0
        for b in data:
            p, q = ref(b).logits.log_softmax(-1), model(b).logits.log_softmax(-1)
            total += torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean").item()
        return total / len(data)


W2 = {"wq": "int2", "aq": "none", "group_size": 16, "symmetric": False, "zero_point": "integer",
      "scale_dtype": "float16", "dtype": "float32"}


@pytest.mark.parametrize("extra,top", [({}, {}), ({"algorithm": "gptq"}, {}), ({}, {"rotation": "hadamard"}),
                                       ({"wq": "fp4", "symmetric": True, "zero_point": "float"}, {}),
                                       ({}, {"finetune_norms": True})])
def test_finetuning_the_scales_brings_the_model_closer_to_float_and_keeps_its_codes(extra, top):
    ref = tiny_llama()
    calib, held_out = batches(8, 1), batches(4, 2)
    scheme = {**W2, **extra}
    norms = top.pop("finetune_norms", False)
    plain = copy.deepcopy(ref)
    apply_plan(plain, {"default": scheme, **top}, calibration_batches=calib)
    tuned = copy.deepcopy(ref)
    report = apply_plan(tuned, {"default": scheme, **top, "finetune": {"epochs": 3, "lr": 0.01, "norms": norms}},
                        calibration_batches=calib)
    assert report.finetune["loss_last_epoch"] < report.finetune["loss_first_epoch"]
    assert kl_to(tuned, ref, calib) < 0.8 * kl_to(plain, ref, calib)
    assert kl_to(tuned, ref, held_out) < kl_to(plain, ref, held_out)
    changed = 0
    for name, m in tuned.named_modules():
        if isinstance(m, QuantLinear):
            p = plain.get_submodule(name)
            assert torch.equal(m.weight_packed, p.weight_packed), name  # the codes are the plan's
            assert m.weight_scale.dtype == p.weight_scale.dtype == torch.float16
            if m.weight_zero_point is not None:
                assert torch.equal(m.weight_zero_point, p.weight_zero_point)
            changed += not torch.equal(m.weight_scale, p.weight_scale)
    assert changed == len([m for m in tuned.modules() if isinstance(m, QuantLinear)])
    norm = tuned.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, plain.model.layers[0].input_layernorm.weight) != norms
    # nothing is left behind: no float weights, no training state, gradients as before
    assert not any(k.endswith("proj.weight") or k == "lm_head.weight" for k in tuned.state_dict())
    assert all(p.requires_grad for p in tuned.parameters())
    assert not any("forward" in m.__dict__ or "_ft_unit" in m.__dict__ for m in tuned.modules())


def test_finetune_options_are_checked_with_the_plan():
    load_plan({"default": W2, "finetune": True})
    for bad, match in (({"epochs": 0}, "epochs"), ({"lr": -1}, "lr"), ({"lr": float("nan")}, "lr"),
                       ({"norms": "yes"}, "norms"), ({"steps": 3}, "unknown 'finetune' keys"), ("fast", "object")):
        with pytest.raises(PlanError, match=match):
            load_plan({"default": W2, "finetune": bad})
    with pytest.raises(PlanError, match="no calibration_batches"):
        apply_plan(tiny_llama(), {"default": W2, "finetune": {}})


def test_a_failed_finetune_leaves_the_float_model_as_it_was():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def forward(m, b):  # the fine-tuning's forwards (round to nearest needs no others) fail midway
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("interrupted")
        return m(b)
    with pytest.raises(RuntimeError, match="interrupted"):
        apply_plan(model, {"default": W2, "finetune": {"norms": True}}, calibration_batches=batches(4, 1),
                   forward_fn=forward)
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith("_proj"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
