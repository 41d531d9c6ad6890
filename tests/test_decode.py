"""alphaquant.decode: the grouped-query attention for one token equals transformers' sdpa, and the
compiled static-cache decoder gives the tokens of transformers' own greedy generate."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from alphaquant.decode import CompiledDecoder, grouped_query_sdpa  # noqa: E402
from alphaquant.plans import apply_plan  # noqa: E402


def _tiny_llama(kv_heads=2):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=kv_heads, max_position_embeddings=256,
                                   initializer_range=0.3)  # peaked logits: no near-ties for greedy tokens to flip on
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


class _Layer(torch.nn.Module):
    num_key_value_groups = 4
    is_causal = True


class _UngroupedLayer(_Layer):
    num_key_value_groups = 1


@pytest.mark.parametrize("mask", [None, "float"])
def test_grouped_query_attention_equals_sdpa(mask):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, 1, 16, generator=g)
    k, v = torch.randn(1, 2, 11, 16, generator=g), torch.randn(1, 2, 11, 16, generator=g)
    m = None
    if mask:
        m = torch.zeros(1, 1, 1, 11)
        m[..., 7:] = float("-inf")  # positions past the current one in a static cache
    got, _ = grouped_query_sdpa(_Layer(), q, k, v, m, scaling=0.25)
    with torch.no_grad():  # transformers' sdpa on the key/value heads repeated
        want, _ = sdpa_attention_forward(_UngroupedLayer(), q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), m,
                                         scaling=0.25)
    torch.testing.assert_close(got, want)


def _quantized_llama_and_greedy_tokens(new, seed, kv_heads=2):
    """A tiny int4 act_int8 Llama, a prompt, and transformers' greedy tokens for it."""
    model = _tiny_llama(kv_heads)
    apply_plan(model, {"default": {"wq": "int4", "group_size": 32, "symmetric": True, "act_int8": True},
                       "overrides": []})
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new)
    return model, ids, want


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_decoder_gives_generate_tokens_eager(kv_heads):
    model, ids, want = _quantized_llama_and_greedy_tokens(12, 2, kv_heads)
    dec = CompiledDecoder(model, max_cache_len=32, compile=False)
    assert model.config._attn_implementation == "alphaquant_sdpa"
    torch.testing.assert_close(dec.generate(ids, 12), want, rtol=0, atol=0)
    torch.testing.assert_close(dec.generate(ids, 12), want, rtol=0, atol=0)  # the cache is reset per call
    dec.close()
    assert model.config._attn_implementation == "sdpa"


def test_decoder_refuses_what_does_not_fit():
    dec = CompiledDecoder(_tiny_llama(), max_cache_len=16, compile=False)
    with pytest.raises(ValueError, match="exceeds max_cache_len"):
        dec.generate(torch.zeros(1, 10, dtype=torch.long), 7)
    with pytest.raises(ValueError, match=r"input_ids must be \[1, prompt length > 0\]"):
        dec.generate(torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="at least 2"):
        CompiledDecoder(_tiny_llama(), max_cache_len=1)


@pytest.mark.slow
@pytest.mark.parametrize("cpp_wrapper", [False, True])  # True: a C++ compile of the graph, a minute or two
def test_compiled_decoder_gives_generate_tokens(cpp_wrapper):
    model, ids, want = _quantized_llama_and_greedy_tokens(8, 3)
    torch._dynamo.reset()
    dec = CompiledDecoder(model, max_cache_len=24, cpp_wrapper=cpp_wrapper)
    torch.testing.assert_close(dec.generate(ids, 8), want, rtol=0, atol=0)
    dec.close()
