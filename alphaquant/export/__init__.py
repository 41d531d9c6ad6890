"""Checkpoints for other engines: compressed-tensors folders (vLLM, transformers)."""
from .compressed_tensors import ExportError, to_compressed_tensors

__all__ = ["ExportError", "to_compressed_tensors"]
