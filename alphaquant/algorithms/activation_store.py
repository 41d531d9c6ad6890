"""Calibration activations on disk when they do not fit in memory.

The sequential pipeline carries every calibration batch's hidden states from one block to the
next. For a large model and many batches they outgrow memory (4096 tokens of a 8192-wide model in
float32 are 128 MB; a 64k-token calibration set is 2 GB per copy, and a block's inputs and
outputs are both alive). Past a limit the hidden states go to files in a temporary folder, one per
batch, and come back memory-mapped one batch at a time, so the pipeline's resident memory is one
batch plus its block, whatever the calibration set's size.

The limit: ``ALPHAQUANT_ACTIVATION_MEMORY_MB`` when set, else a quarter of the memory available
when the pipeline starts (psutil; 2 GB without it).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator, Optional

import torch

ENV_LIMIT = "ALPHAQUANT_ACTIVATION_MEMORY_MB"


def activation_limit() -> int:
    """Bytes of block inputs the pipeline keeps in memory before it moves them to disk."""
    value = os.environ.get(ENV_LIMIT)
    if value is not None:
        try:
            mb = float(value)
        except ValueError:
            raise ValueError(f"{ENV_LIMIT} must be a number of megabytes; got {value!r}") from None
        if not mb >= 0:
            raise ValueError(f"{ENV_LIMIT} must be >= 0 megabytes; got {value!r}")
        return int(mb * (1 << 20))
    try:
        import psutil

        return psutil.virtual_memory().available // 4
    except ImportError:
        return 2 << 30


def hidden_bytes(inputs) -> int:
    """Bytes of the first positional tensor of every (args, kwargs) batch."""
    return sum(a[0].numel() * a[0].element_size() for a, _ in inputs if a and isinstance(a[0], torch.Tensor))


class SpilledInputs:
    """Block inputs [(args, kwargs)] whose hidden states (args[0]) live in files of a temporary
    folder; iterating memory-maps them back one batch at a time. The other arguments (position
    embeddings, masks: the same for every batch, or small) stay in memory."""

    def __init__(self, folder: Optional[str] = None):
        self.folder = tempfile.mkdtemp(prefix="alphaquant-activations-", dir=folder)
        self._items: list = []

    def append(self, item: tuple) -> None:
        """Add one batch, (args, kwargs), as a list would."""
        args, kwargs = item
        path = os.path.join(self.folder, f"{len(self._items)}.pt")
        torch.save(args[0].detach().contiguous(), path)
        self._items.append((path, tuple(args[1:]), kwargs))

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple]:
        for path, rest, kwargs in self._items:
            yield (torch.load(path, mmap=True, weights_only=True),) + rest, kwargs

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self._items = []


def spill(inputs, folder: Optional[str] = None) -> SpilledInputs:
    """``inputs`` moved to disk (a SpilledInputs)."""
    store = SpilledInputs(folder)
    try:
        for item in inputs:
            store.append(item)
    except BaseException:
        store.close()
        raise
    return store
