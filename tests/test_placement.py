"""device_map: a checkpoint's layers allocated straight on their devices, bad maps refused."""
import pytest
import torch

from alphaquant.checkpoint_file import load_quantized
from alphaquant.streaming import stream_quantize

transformers = pytest.importorskip("transformers")
from conftest import CUDA_OK, cuda_only  # noqa: E402
from test_streaming import sharded_llama  # noqa: E402

PLAN = {"default": {"wq": "int4", "symmetric": False, "group_size": 32},
        "overrides": [{"pattern": "model.embed_tokens", "wq": "int8", "group_size": 64}]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("placement")
    out = str(d / "out")
    stream_quantize(sharded_llama(d / "src", tied=False), PLAN, out)
    return out


def meta_model(path):
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(path)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.cpu()


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, {"model": "cpu", "lm_head": "cpu"},
                                        {"model.layers.0": "cpu", "": "cpu"}]
                         + (["auto"] if not CUDA_OK else []))
def test_a_map_onto_the_cpu_loads_the_same_model(checkpoint, device_map):
    ids = torch.randint(0, 200, (1, 9))
    want = logits(load_quantized(meta_model(checkpoint), checkpoint), ids)
    model = load_quantized(meta_model(checkpoint), checkpoint, device_map=device_map)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert torch.equal(logits(model, ids), want)


@pytest.mark.parametrize("device_map, match", [
    ({"model.nope": "cpu", "": "cpu"}, "not a module of this model"),
    ({"model": "cpu"}, "leaves .* tensors without a device .*lm_head"),
    ("disk", "offloading to disk is not supported"),
    ({"": "tpu"}, "not a device|cpu or cuda"),
    ({"": True}, "not a device"),
] + ([("cuda:0", "no CUDA device is available")] if not CUDA_OK else []))
def test_bad_maps_are_refused_before_anything_is_allocated(checkpoint, device_map, match):
    model = meta_model(checkpoint)
    with pytest.raises(ValueError, match=match):
        load_quantized(model, checkpoint, device_map=device_map)
    assert all(t.device.type == "meta" for t in model.state_dict().values())


def test_device_and_device_map_together_are_refused(checkpoint):
    with pytest.raises(ValueError, match="not both"):
        load_quantized(meta_model(checkpoint), checkpoint, device="cpu", device_map="cpu")


@cuda_only
def test_layers_split_between_a_gpu_and_the_cpu(checkpoint):
    ids = torch.randint(0, 200, (1, 9))
    want = logits(load_quantized(meta_model(checkpoint), checkpoint), ids)
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
             "model.norm": "cpu", "lm_head": "cpu"}
    model = load_quantized(meta_model(checkpoint), checkpoint, device_map=split)
    assert model.model.layers[0].mlp.up_proj.weight_packed.device.type == "cuda"
    assert model.model.layers[1].mlp.up_proj.weight_packed.device.type == "cpu"
    torch.testing.assert_close(logits(model, ids.cuda()), want, rtol=2e-3, atol=2e-3)
    auto = load_quantized(meta_model(checkpoint), checkpoint, device_map="auto")
    assert all(t.device.type == "cuda" for t in auto.state_dict().values())  # a tiny model fits the GPU
    torch.testing.assert_close(logits(auto, ids.cuda()), want, rtol=2e-3, atol=2e-3)
