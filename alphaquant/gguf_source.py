"""A Llama-family GGUF file read as a source of Hugging Face-named float tensors, one at a time.

What streaming quantization needs of its input (the interface of ShardedReader): the names,
dtypes and shapes of the tensors the model's architecture holds, and each tensor on request.
Block-quantized tensors (Q4_1, Q8_0, the K-quants, ...) are decoded to float32 by the gguf
package, float ones keep their type; q/k rows go back from llama.cpp's rotary order to the
Hugging Face one, as transformers' GGUF loader does (so the values are the ones the in-memory path
quantizes). The file is memory-mapped by the gguf reader; the pages of each tensor are dropped from
the process once it has been decoded, so resident memory does not grow with the file.
"""
from __future__ import annotations

import mmap
import os

import numpy as np
import torch

from .export.from_gguf import _LINEARS, _NORMS, _unpermute

_FLOAT = {"F32": ("F32", torch.float32), "F16": ("F16", torch.float16), "BF16": ("BF16", torch.bfloat16)}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def is_gguf_file(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".gguf")


def hf_name(gguf_name: str):
    """The Hugging Face Llama name of a GGUF tensor name, or None for tensors a Llama has not."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] in ("weight", "bias"):
        hf = _LINEARS.get(parts[2]) or _NORMS.get(parts[2])
        if hf is not None:
            return f"model.layers.{parts[1]}.{hf}.{parts[3]}"
    return None


class GGUFSource:
    """Tensors of a Llama GGUF file under Hugging Face names: ``tensors`` maps name -> (safetensors
    dtype of what :meth:`get` returns, shape, the file)."""

    def __init__(self, path: str, config):
        import gguf

        self.path = path
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as e:  # noqa: BLE001  the gguf package raises ValueError, struct.error, ...
            raise ValueError(f"{path} is not a readable GGUF file: {type(e).__name__}: {str(e)[:200]}") from None
        self._heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
        self.tensors, self._src, self.unknown = {}, {}, []
        for t in self._reader.tensors:
            name = hf_name(t.name)
            if name is None:
                self.unknown.append(t.name)
                continue
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
            dtype = _FLOAT.get(t.tensor_type.name, ("F32", torch.float32))[0]
            self.tensors[name] = (dtype, shape, path)
            self._src[name] = t

    @property
    def shards(self) -> list:
        return [self.path]

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor in the file (what is read), not of its decoded form."""
        return int(self._src[name].n_bytes)

    def torch_dtype(self, name: str) -> torch.dtype:
        return _FLOAT.get(self._src[name].tensor_type.name, ("F32", torch.float32))[1]

    def get(self, name: str) -> torch.Tensor:
        import gguf

        t = self._src[name]
        dtype, shape, _ = self.tensors[name]
        kind = t.tensor_type.name
        try:
            if kind in _FLOAT:
                raw = np.array(t.data, copy=True)
                out = torch.from_numpy(raw.view(np.uint16) if kind == "BF16" else raw)
                out = out.view(torch.bfloat16) if kind == "BF16" else out
            else:
                out = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type),
                                                            dtype=np.float32))
        except (ValueError, NotImplementedError) as e:
            raise ValueError(f"{self.path}: tensor {t.name} ({kind}) cannot be decoded: {e}") from None
        finally:
            self._drop_pages(t)
        out = out.reshape(shape)
        layer = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if layer in self._heads:
            out = torch.from_numpy(_unpermute(out.numpy(), self._heads[layer]))
        return out.contiguous()

    def _drop_pages(self, t) -> None:
        """Unmaps the pages of ``t`` from this process (clean file pages: nothing is written)."""
        mm = getattr(self._reader.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        start = int(t.data_offset) - int(t.data_offset) % mmap.PAGESIZE
        end = int(t.data_offset) + int(t.n_bytes)
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        mm = getattr(self._reader.data, "_mmap", None)
        self._reader = None
        if mm is not None:
            try:
                mm.close()
            except (BufferError, ValueError):  # views still alive elsewhere: the map goes with them
                pass
