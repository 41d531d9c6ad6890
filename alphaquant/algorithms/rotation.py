"""Rotating a Llama-family model into a basis without outlier channels (as QuaRot / SpinQuant).

The residual stream x of a pre-norm decoder can be replaced by x R for any orthogonal R without
changing the model's function, once each RMSNorm's weight is folded into the linears it feeds
(RMSNorm(x R) = RMSNorm(x) R because R keeps norms):
- embedding E -> E R; every linear reading the residual (q, k, v, gate, up, lm_head) W -> W R;
  every linear writing it (o_proj, down_proj) W -> R^T W (bias b -> b R);
- values per attention head: v_proj's rows and o_proj's columns rotated by one head-size H;
- down_proj's input (act(gate) * up, not in the residual basis) is rotated online: the layer
  gets W -> W H and computes x H on the fly (a Kronecker-factored Hadamard, cheap next to the matmul).
R is a Hadamard matrix with random signs (a seeded, different rotation per seed). After rotation
each weight's and activation's energy is spread over all channels: int8 activations lose far
less (no outlier tokens' channels dominate a per-token scale) and low-bit weight groups have no
single large value to fit. The rotated model is the same function in float (tested to
round-off); the quantized model is not, and is better.

A tied lm_head is untied (the final norm's weight is folded into it, not into the embedding).
The online rotation of down_proj is a forward pre-hook recorded in the layer's
``alphaquant_input_rotation`` attribute, which QuantLinear keeps and checkpoints store.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import nn

from .hadamard import (hadamard_factor_matrices, hadamard_factors, hadamard_matrix, hadamard_transform,
                       random_signed_hadamard)

ROTATIONS = ("none", "hadamard")
ATTR = "alphaquant_input_rotation"


class RotationError(ValueError):
    """A model this rotation cannot be applied to (says why and what is supported)."""


def rotate_input_hook(module: nn.Module, args):
    """Forward pre-hook: the layer's input x -> x H (H the layer's online Hadamard)."""
    if getattr(module, ATTR, None) != "hadamard":
        return None
    mats = [getattr(module, f"rotation_factor{i}") for i in range(module.rotation_factors)]
    return (hadamard_transform(args[0], mats),) + tuple(args[1:])


def set_input_rotation(module: nn.Module, kind: Optional[str]) -> None:
    """Make ``module`` rotate its input online (kind "hadamard") before computing; idempotent."""
    if kind is None:
        return
    if kind != "hadamard":
        raise ValueError(f"input rotation must be 'hadamard' or None; got {kind!r}")
    width = getattr(module, "in_features", None)
    if width is None or hadamard_factors(width) is None:
        raise ValueError(f"no Hadamard rotation of {width} input features")
    setattr(module, ATTR, kind)
    if not getattr(module, "_rotation_hooked", False):
        tensors = itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))
        device = next((t.device for t in tensors), None)
        mats = hadamard_factor_matrices(width)
        for i, m in enumerate(mats):  # buffers: they follow the layer to its device (not in its state_dict)
            module.register_buffer(f"rotation_factor{i}", m.to(device), persistent=False)
        module.rotation_factors = len(mats)
        module.register_forward_pre_hook(rotate_input_hook)
        module._rotation_hooked = True


def clear_input_rotation(module: nn.Module) -> None:
    """Stop ``module`` rotating its input (its hook stays and does nothing)."""
    if hasattr(module, ATTR):
        delattr(module, ATTR)


def is_rotated(model: nn.Module) -> bool:
    return bool(getattr(model, "alphaquant_rotated", False))


def _decoder(model: nn.Module):
    """(embedding, decoder layers, final norm, lm_head) of a Llama-family causal LM, or RotationError."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    emb, norm, head = getattr(inner, "embed_tokens", None), getattr(inner, "norm", None), getattr(model, "lm_head", None)
    if layers is None or not isinstance(emb, nn.Embedding) or norm is None or not isinstance(head, nn.Linear):
        raise RotationError(f"rotation supports Llama-family causal LMs (model.embed_tokens, model.layers, model.norm, "
                            f"lm_head: Llama, Mistral, Qwen2, SmolLM); {type(model).__name__} is not one")
    for i, layer in enumerate(layers):
        for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            try:
                sub = layer.get_submodule(path)
            except AttributeError:
                sub = None
            if not isinstance(sub, nn.Linear):
                raise RotationError(f"rotation: model.layers.{i}.{path} is not an nn.Linear (quantized already, or "
                                    f"not a Llama-family block); apply rotation to a float model")
        for nname in ("input_layernorm", "post_attention_layernorm"):
            _check_norm(getattr(layer, nname, None), f"model.layers.{i}.{nname}")
    _check_norm(norm, "model.norm")
    return emb, layers, norm, head


def _check_norm(norm, where: str) -> None:
    w = getattr(norm, "weight", None)
    if norm is None or "rmsnorm" not in type(norm).__name__.lower() or "gemma" in type(norm).__name__.lower():
        raise RotationError(f"rotation: {where} must be an RMSNorm with a plain weight (x * w); got "
                            f"{type(norm).__name__}")
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
        raise RotationError(f"rotation: {where} must have a 1-D weight and no bias")


def _head_dim(model: nn.Module, attn: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    hd = getattr(cfg, "head_dim", None) or getattr(attn, "head_dim", None)
    if hd is None:
        hd = cfg.hidden_size // cfg.num_attention_heads
    return int(hd)


def rotate_model(model: nn.Module, seed: int = 0, numeric: bool = True, undo: Optional[list] = None) -> None:
    """Rotate ``model`` in place (see the module docstring). ``numeric=False`` only builds the
    structure a rotated checkpoint loads into (untied lm_head, online rotation of down_proj).
    ``undo`` collects (tensor, old value) pairs to restore on failure. A model rotated already
    (``is_rotated``) is left as it is."""
    if is_rotated(model):
        return
    emb, layers, norm, head = _decoder(model)
    model.alphaquant_rotated = True
    if undo is not None:
        undo.append(("flag", model))
    cfg = getattr(model, "config", None)
    if head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
        if undo is not None:
            undo.append(("untie", (head, emb)))
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        cfg.tie_word_embeddings = False
        if undo is not None:
            undo.append(("config", cfg))
    for layer in layers:
        down = layer.mlp.down_proj
        if hadamard_factors(down.in_features) is not None and getattr(down, ATTR, None) is None:
            set_input_rotation(down, "hadamard")
            if undo is not None:
                undo.append(("rotation", down))
    if not numeric:
        return
    d = emb.weight.shape[1]
    r = random_signed_hadamard(d, seed) if hadamard_factors(d) else _random_orthogonal(d, seed)

    def update(t: torch.Tensor, value: torch.Tensor) -> None:
        if undo is not None:
            undo.append((t, t.detach().clone()))
        t.copy_(value.to(t.dtype))

    with torch.no_grad():
        def fold_norm(nrm, linears):
            g = nrm.weight.detach().to(torch.float64)
            for lin in linears:
                update(lin.weight, lin.weight.to(torch.float64) * g)
            update(nrm.weight, torch.ones_like(nrm.weight))

        def rotate_in(lin, m):
            update(lin.weight, lin.weight.to(torch.float64) @ m.to(lin.weight.device))

        def rotate_out(lin, m):
            m = m.to(lin.weight.device)
            update(lin.weight, m.T @ lin.weight.to(torch.float64))
            if lin.bias is not None:
                update(lin.bias, lin.bias.to(torch.float64) @ m)

        update(emb.weight, emb.weight.to(torch.float64) @ r.to(emb.weight.device))
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            fold_norm(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
            fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                rotate_in(lin, r)
            rotate_out(attn.o_proj, r)
            rotate_out(mlp.down_proj, r)
            _rotate_values(attn, _head_dim(model, attn), update)
            if getattr(mlp.down_proj, ATTR, None) == "hadamard":
                rotate_in(mlp.down_proj, hadamard_matrix(mlp.down_proj.in_features))
        fold_norm(norm, [head])
        rotate_in(head, r)


def _rotate_values(attn: nn.Module, hd: int, update) -> None:
    """v' = v H per head (v_proj's rows), o_proj's columns per head by the same H."""
    v, o = attn.v_proj, attn.o_proj
    if v.out_features % hd or o.in_features % hd or hadamard_factors(hd) is None:
        return
    h = hadamard_matrix(hd).to(v.weight.device)
    wv = v.weight.to(torch.float64).reshape(-1, hd, v.in_features)
    update(v.weight, torch.einsum("ji,hjk->hik", h, wv).reshape(v.weight.shape))
    if v.bias is not None:
        update(v.bias, (v.bias.to(torch.float64).reshape(-1, hd) @ h).reshape(-1))
    wo = o.weight.to(torch.float64).reshape(o.out_features, -1, hd)
    update(o.weight, (wo @ h).reshape(o.weight.shape))


def _random_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def restore(undo: list) -> None:
    """Put back what rotate_model changed (from its ``undo`` list), last change first."""
    with torch.no_grad():
        for t, old in reversed(undo):
            if not isinstance(t, str):
                t.copy_(old)
            elif t == "untie":
                head, emb = old
                head.weight = emb.weight
            elif t == "flag":
                del old.alphaquant_rotated
            elif t == "config":
                old.tie_word_embeddings = True
            elif t == "rotation":
                clear_input_rotation(old)
