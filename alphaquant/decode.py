"""Fast greedy decoding of a quantized causal LM: a static KV cache and a one-token step compiled
by torch.compile (as gpt-fast and llama.cpp-style loops do), so that a token costs its kernels and
little framework time.

    from alphaquant.decode import CompiledDecoder
    dec = CompiledDecoder(model, max_cache_len=512)
    tokens = dec.generate(input_ids, max_new_tokens=64)   # [1, prompt + new]

The step attends with ``alphaquant_sdpa`` (registered in transformers' attention functions): for
one query token of a grouped-query model the query heads are grouped onto their key/value heads,
so attention reads the cache as stored. transformers' own sdpa path does that only outside
torch.compile; compiled, it copies every key/value head n_rep times per layer and token
(``repeat_kv``), which cost a 1.1B Llama with 4 KV heads ~7% of its decode speed here.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

ATTENTION = "alphaquant_sdpa"


def grouped_query_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' sdpa attention, but a single query token of a grouped-query layer is computed
    on the key/value heads as stored: query [b, h, 1, d] -> [b, kv_heads, n_rep, d] (the n_rep
    query heads of a group become its "positions"; the mask, the same for every head, broadcasts).
    Anything else goes to transformers' sdpa_attention_forward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_rep = getattr(module, "num_key_value_groups", 1)
    b, h, q_len, d = query.shape
    mask_ok = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1
                                        and attention_mask.shape[2] == 1)
    if (q_len != 1 or n_rep == 1 or not mask_ok or dropout or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or key.shape[1] * n_rep != h):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    grouped = query.reshape(b, h // n_rep, n_rep, d)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                           scale=scaling)
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Registers :func:`grouped_query_sdpa` as transformers attention ``alphaquant_sdpa``; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, grouped_query_sdpa)
    return ATTENTION


class CompiledDecoder:
    """Greedy decoding of ``model`` (a transformers causal LM, batch 1) with a static cache of
    ``max_cache_len`` positions and the one-token step compiled. The prompt runs eagerly through
    the same cache. The model's attention is switched to ``alphaquant_sdpa`` (same results as
    sdpa) while the decoder lives; :meth:`close` restores it. Guards on module attributes are
    skipped (as decode loops do): do not change the model's modules between calls.
    ``cpp_wrapper``: the compiled graph calls its kernels and our ops from generated C++ instead
    of Python (inductor's cpp_wrapper): SmolLM2 Q4_0 decoded ~7% faster here, but the first call
    compiles several times longer (about 100 s instead of 5-20 s on 2 cores)."""

    def __init__(self, model, max_cache_len: int = 1024, compile: bool = True, cpp_wrapper: bool = False):
        from transformers import StaticCache

        if not hasattr(model, "generate") or getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("CompiledDecoder takes a decoder-only causal LM (e.g. LlamaForCausalLM)")
        if max_cache_len < 2:
            raise ValueError(f"max_cache_len must be at least 2, got {max_cache_len}")
        self.model, self.max_cache_len = model, int(max_cache_len)
        self._attention = getattr(model.config, "_attn_implementation", None)
        if self._attention in (None, "sdpa"):
            model.set_attn_implementation(register_attention())
        self._cache = StaticCache(config=model.config, max_batch_size=1, max_cache_len=self.max_cache_len)
        self._step = self._forward
        self.timings: dict = {}
        if compile:
            options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            if cpp_wrapper:
                options["cpp_wrapper"] = True
            self._step = torch.compile(self._forward, dynamic=False, options=options)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # A 4-D mask over the whole cache (a fixed shape: one compiled graph): each query position
        # sees the cache up to itself. Given a 2-D one, transformers' sdpa path drops the mask for
        # one query token and then attends to the cache's unfilled slots as well.
        keys = torch.arange(self.max_cache_len, device=ids.device)
        mask = (keys[None, :] <= positions[:, None])[None, None]
        return self.model(ids, attention_mask=mask, cache_position=positions, past_key_values=self._cache,
                          use_cache=True).logits[:, -1]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: Optional[int] = None) -> torch.Tensor:
        """[1, prompt + new] greedy tokens (stopping early at ``eos_token_id``). ``self.timings``
        then holds the seconds of the prompt and of the new tokens after the first."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [1, prompt length > 0], got {list(input_ids.shape)}")
        n = input_ids.shape[1]
        if n + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt ({n}) + max_new_tokens ({max_new_tokens}) exceeds max_cache_len "
                             f"({self.max_cache_len}); make the decoder with a larger one")
        device = next(self.model.parameters(), torch.empty(0)).device
        self._cache.reset()
        input_ids = input_ids.to(device)
        tokens = [input_ids]
        self.timings = {"prompt_s": 0.0, "decode_s": 0.0, "decoded": 0}
        if max_new_tokens <= 0:
            return input_ids
        t = time.perf_counter()
        tok = self._forward(input_ids, torch.arange(n, device=device)).argmax(-1, keepdim=True)
        tokens.append(tok)
        self.timings["prompt_s"] = time.perf_counter() - t
        t = time.perf_counter()
        for pos in range(n, n + max_new_tokens - 1):
            if eos_token_id is not None and int(tok) == eos_token_id:
                break
            tok = self._step(tok, torch.tensor([pos], device=device)).argmax(-1, keepdim=True)
            tokens.append(tok)
        self.timings.update(decode_s=time.perf_counter() - t, decoded=len(tokens) - 2)
        return torch.cat(tokens, dim=1)

    def close(self) -> None:
        """Gives the model its own attention back (the compiled step is not used afterwards)."""
        if self._attention in (None, "sdpa") and getattr(self.model.config, "_attn_implementation", None) == ATTENTION:
            self.model.set_attn_implementation(self._attention or "sdpa")
