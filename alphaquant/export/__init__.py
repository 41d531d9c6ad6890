"""Checkpoints for other engines: compressed-tensors folders (vLLM, transformers) and GGUF files
(llama.cpp); compressed-tensors folders also import (from_compressed_tensors)."""
from .compressed_tensors import ExportError, to_compressed_tensors
from .gguf_file import to_gguf

__all__ = ["ExportError", "to_compressed_tensors", "to_gguf"]
