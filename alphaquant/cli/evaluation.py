"""Accuracy measures for the command line: perplexity of a causal LM and embedding cosine
similarity of an encoder, on text that calibration never saw."""
from __future__ import annotations

import math
from typing import Iterator

import torch


PERPLEXITY_WINDOW = 512  # tokens per perplexity window
CALIBRATION_WINDOW = 256  # tokens per calibration batch


def corpus_text() -> str:
    """English text that ships with Python (the pydoc topics, about 465k characters)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


LICENSE_TEXTS = ("GPL-3", "GFDL-1.3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GPL-2")


def license_text() -> str:
    """A second English corpus, never used for calibration: the free-software licenses that
    Debian-family systems ship in /usr/share/common-licenses (about 130k characters of legal
    prose, unlike the pydoc topics). Raises FileNotFoundError where they are missing."""
    parts = []
    for name in LICENSE_TEXTS:
        with open(f"/usr/share/common-licenses/{name}", encoding="utf-8") as f:
            parts.append(f.read())
    return "\n\n".join(parts)


def split_text(text: str) -> tuple[str, str]:
    """(calibration, evaluation): the first fifth and the rest, so the two never overlap."""
    cut = len(text) // 5
    return text[:cut], text[cut:]


def token_windows(tokenizer, text: str, n_tokens: int, window: int) -> Iterator[torch.Tensor]:
    """Non-overlapping [1, window] slices of the first ``n_tokens`` tokens of ``text``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:n_tokens]
    for start in range(0, len(ids) - window + 1, window):
        yield ids[start:start + window].unsqueeze(0)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, n_tokens: int = 4096, window: int = PERPLEXITY_WINDOW,
               progress=None) -> float:
    """exp(mean next-token loss) over non-overlapping windows of the first ``n_tokens`` tokens.

    Raises ValueError when the text gives less than one window.
    """
    total, count = 0.0, 0
    windows = list(token_windows(tokenizer, text, n_tokens, window))
    if not windows:
        raise ValueError(f"perplexity needs at least one window of {window} tokens; got fewer "
                         f"(n_tokens={n_tokens})")
    from ..placement import input_device

    device = input_device(model)
    for ids in progress(windows, desc="perplexity") if progress else windows:
        ids = ids.to(device)
        out = model(ids, labels=ids)
        total += out.loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(total / count)


@torch.no_grad()
def embeddings(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled, normalized sentence embeddings (the MiniLM recipe)."""
    from ..placement import input_device

    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**batch.to(input_device(model))).last_hidden_state.cpu()
    mask = batch["attention_mask"].cpu().unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def eval_sentences(text: str, n: int = 256) -> list[str]:
    parts = [p.strip() for p in text.split(".") if len(p.strip()) > 40]
    return parts[:n]


def cosine_similarity(ref: torch.Tensor, other: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(ref, other, dim=-1).mean().item()
