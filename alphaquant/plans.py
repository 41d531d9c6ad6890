"""JSON quantization plans: which layers get which scheme, applied to a whole model.

A plan is {"default": {...}, "overrides": [{"pattern": "glob", ...}, ...]}. Every layer starts
from "default"; then every override whose glob ``pattern`` matches the module's name is applied
in order, so later overrides win over earlier ones. Keys of a scheme:
  wq, aq            quantizer names (int2, int4, int6, int8, fp8, fp8_e4m3, fp8_e5m2, fp4, fp4_e2m1, nf4)
                    or "none" (weights: keep the layer in float; activations: leave them float)
  group_size        values per scale (default 128)
  granularity       per_group (default), per_channel or per_tensor, for the weight
  act_granularity   the same for activations (default per_group; per_channel = per token)
  symmetric         integer symmetry (default True)
  dtype             dtype of dequantized values: float32, float16, bfloat16 (default bfloat16)
  act_static        calibrate static activation scales on calibration data (default False)
  observer          minmax (default), moving_average, percentile or mse: used for act_static
  skip              true: keep the layer in float
  clip_search       true: choose each weight group's clipping by error search (better 2-4 bit)
  zero_opt          true: refine asymmetric int zero points by l_p error minimization (HQQ-style)
  scale_dtype       storage of weight scales/zero points: float32 (default), float16, bfloat16
  algorithm         rtn (default: round to nearest) or gptq (calibrated error feedback, needs
                    calibration data; alphaquant/algorithms/gptq.py)
  damp, block_size, act_order, refit   GPTQ options (0.01, 128, false, false; refit: scales and
                    zero points refitted to the chosen codes by least squares on the Hessian)
  awq               true: activation-aware per-channel scaling, searched on calibration data and
                    folded into the preceding norm/linear (with rtn or gptq)
  codebook_granularity  lut4 only: per_tensor (default) or per_channel learned code books
  zero_point        asymmetric int weights: float (default), integer (rounded into the code
                    range, as GPTQ / compressed-tensors checkpoints store it) or byte (one
                    byte each, on a grid of 2^(bits-7) codes; alphaquant.formats.zero_grid)
  act_int8          true: on the CPU, compute the layer with its activations quantized to int8 per
                    block of 32 and integer dot products (llama.cpp's scheme; much faster, a small
                    accuracy cost, RESULTS.md); weights int1..int8, mxint8, fp4/mxfp4/nvfp4 (E2M1),
                    fp6_e2m3/mxfp6_e2m3 with group_size a multiple of 32 or 16 (or per channel/tensor),
                    no "aq". Stored weights are unchanged; GPUs and training use the
                    float-activation path.
  smoothquant       true: SmoothQuant-style migration of activation outliers into the weights
                    (for int8/fp8 activations); smooth_alpha fixes its exponent (else searched)
Schemes with gptq, awq or smoothquant are quantized block by block on calibration data
(alphaquant/algorithms/sequential.py).
Top-level "finetune": {"epochs": 2, "lr": 0.002, "norms": false} (or true for these) then trains
the weight scales of the quantized model end to end on the calibration data, by distillation from
its float self (alphaquant/algorithms/finetune.py: codes and bits unchanged, much less error at
2-3 bits). Top-level "rotation": "hadamard" first rotates a Llama-family model into a basis without outlier
channels (alphaquant/algorithms/rotation.py: same function in float, much less quantization error
for int8 activations and 2-4 bit weights); "none" (default) leaves it as it is.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from ._logging import logger
from .nn.quant_embedding import QuantEmbedding, TiedQuantLinear
from .nn.quant_linear import QuantLinear
from .quantizers import MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, PercentileObserver
from .layout import GRANULARITIES
from .formats import INT8_ACT_BLOCK, INT8_ACT_FORMATS, MX_BLOCK, NVFP4_BLOCK, int8_act_takes
from .quantizers.base import MAX_GROUP_SIZE
from .quantizers.base import BlockScaledConfig
from .quantizers.nvfp4 import fused_global_scales
from .quantizers.registry import FLOAT_NAMES, lookup
from .algorithms.rotation import ATTR as ROTATION_ATTR, ROTATIONS, RotationError, restore, rotate_model
from .algorithms.finetune import FinetuneOptions, check_options as finetune_options, finetune_scales

SCHEME_KEYS = {"wq", "aq", "group_size", "granularity", "act_granularity", "symmetric", "dtype", "act_static",
               "observer", "skip", "clip_search", "zero_opt", "scale_dtype", "algorithm", "damp", "block_size",
               "act_order", "refit", "awq", "smoothquant", "smooth_alpha", "codebook_granularity", "zero_point",
               "act_int8"}
ALGORITHMS = ("rtn", "gptq")
OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
             "percentile": PercentileObserver, "mse": MSEObserver}
DEFAULTS = {"wq": "int8", "aq": None, "group_size": 128, "granularity": "per_group", "act_granularity": "per_group",
            "symmetric": True, "dtype": "bfloat16", "act_static": False, "observer": "minmax", "skip": False,
            "clip_search": False, "zero_opt": False, "scale_dtype": "float32", "algorithm": "rtn", "damp": 0.01,
            "block_size": 128, "act_order": False, "refit": False, "awq": False, "smoothquant": False, "smooth_alpha": None,
            "codebook_granularity": "per_tensor", "zero_point": "float", "act_int8": False}


class PlanError(ValueError):
    """A plan that cannot be applied: says which key or layer and what is allowed."""


MAX_PLAN_BYTES = 1 << 20
MAX_OVERRIDES = 10_000


def load_plan(plan: Union[str, os.PathLike, dict]) -> dict:
    """Read (from a path or a dict) and validate a plan; returns a normalized copy.

    Every scheme a plan can produce is checked here, down to building its quantizers, so a plan
    that cannot be applied fails before any model is loaded. Raises PlanError.
    """
    if isinstance(plan, (str, os.PathLike)):
        plan = _read_plan_file(plan)
    if not isinstance(plan, dict):
        raise PlanError(f"a plan must be a JSON object with 'default' and 'overrides'; got {type(plan).__name__}")
    unknown = set(plan) - {"default", "overrides", "name", "description", "rotation", "finetune"}
    if unknown:
        raise PlanError(f"unknown top-level plan keys {sorted(map(str, unknown))}; allowed: default, overrides, "
                        f"name, description, rotation, finetune")
    if "rotation" in plan and plan["rotation"] not in ROTATIONS:
        raise PlanError(f"plan 'rotation' must be one of {list(ROTATIONS)}; got {_short(plan['rotation'])}")
    if "finetune" in plan:
        try:
            finetune_options(plan["finetune"])
        except ValueError as e:
            raise PlanError(str(e)) from None
    for key in ("name", "description"):
        if key in plan and not isinstance(plan[key], str):
            raise PlanError(f"plan '{key}' must be a string; got {type(plan[key]).__name__}")
    plan = dict(plan)
    plan.setdefault("default", {})
    plan.setdefault("overrides", [])
    _check_scheme(plan["default"], "default")
    if not isinstance(plan["overrides"], list):
        raise PlanError("'overrides' must be a list of objects with a 'pattern'")
    if len(plan["overrides"]) > MAX_OVERRIDES:
        raise PlanError(f"'overrides' has {len(plan['overrides'])} entries; at most {MAX_OVERRIDES} are allowed")
    for i, o in enumerate(plan["overrides"]):
        where = f"overrides[{i}]"
        if not isinstance(o, dict) or not isinstance(o.get("pattern"), str) or not o["pattern"]:
            raise PlanError(f"{where} needs a non-empty string 'pattern' (a glob on module names)")
        _check_scheme({k: v for k, v in o.items() if k != "pattern"}, where)
    plan = copy.deepcopy(plan)  # only plain JSON values are left, and they are shallow
    # Build the quantizers of every scheme the plan can give a layer (the default, and the
    # default with each override), so bad combinations (zero_opt on a symmetric format) fail now.
    candidates = [("default", {})] + [(f"overrides[{i}]", o) for i, o in enumerate(plan["overrides"])]
    for where, override in candidates:
        scheme = {**DEFAULTS, **plan["default"], **{k: v for k, v in override.items() if k != "pattern"}}
        if scheme["awq"] and scheme["smoothquant"]:
            raise PlanError(f"{where}: awq and smoothquant both choose per-channel scales; pick one")
        sets_zero = override.get("zero_point", plan["default"].get("zero_point") if where == "default" else None)
        if sets_zero in ("integer", "byte") and scheme["symmetric"] and str(scheme["wq"]).startswith("int"):
            raise PlanError(f"{where}: zero_point '{sets_zero}' needs \"symmetric\": false (symmetric int weights "
                            f"have no zero point)")
        try:
            build_quantizers(scheme)
        except (TypeError, ValueError) as e:
            raise PlanError(f"{where}: {e}") from None
    return plan


def _read_plan_file(path) -> object:
    try:
        size = os.path.getsize(path)
        if size > MAX_PLAN_BYTES:
            raise PlanError(f"plan {path} is {size} bytes; a plan is a small JSON file (at most {MAX_PLAN_BYTES})")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PlanError(f"cannot read plan {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlanError(f"plan {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"plan {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise PlanError(f"plan {path} is nested too deeply to be a plan") from None


def _check_scheme(s: dict, where: str) -> None:
    if not isinstance(s, dict):
        raise PlanError(f"{where} must be an object")
    unknown = set(s) - SCHEME_KEYS
    if unknown:
        raise PlanError(f"{where}: unknown keys {sorted(map(str, unknown))}; allowed: {sorted(SCHEME_KEYS)}")
    for side in ("wq", "aq"):
        if side in s:
            try:
                lookup(s[side])
            except ValueError as e:
                raise PlanError(f"{where}.{side}: {e}") from None
    if "group_size" in s and (not isinstance(s["group_size"], int) or isinstance(s["group_size"], bool)
                              or not 0 < s["group_size"] <= MAX_GROUP_SIZE):
        raise PlanError(f"{where}.group_size must be a positive integer (at most {MAX_GROUP_SIZE}); got {_short(s['group_size'])}")
    for key in ("granularity", "act_granularity"):
        if key in s and not (isinstance(s[key], str) and s[key] in GRANULARITIES):
            raise PlanError(f"{where}.{key} must be one of {GRANULARITIES}; got {_short(s[key])}")
    for key in ("symmetric", "act_static", "skip", "clip_search", "zero_opt", "act_order", "refit", "awq", "smoothquant",
                "act_int8"):
        if key in s and not isinstance(s[key], bool):
            raise PlanError(f"{where}.{key} must be true or false; got {_short(s[key])}")
    for key in ("dtype", "scale_dtype"):
        if key in s and not (isinstance(s[key], str) and s[key] in ("float32", "float16", "bfloat16")):
            raise PlanError(f"{where}.{key} must be float32, float16 or bfloat16; got {_short(s[key])}")
    if "algorithm" in s and not (isinstance(s["algorithm"], str) and s["algorithm"] in ALGORITHMS):
        raise PlanError(f"{where}.algorithm must be one of {ALGORITHMS}; got {_short(s['algorithm'])}")
    if "damp" in s and (not isinstance(s["damp"], (int, float)) or isinstance(s["damp"], bool)
                        or not 0 <= s["damp"] < 1):
        raise PlanError(f"{where}.damp must be a number in [0, 1) (GPTQ's damping); got {_short(s['damp'])}")
    if "block_size" in s and (not isinstance(s["block_size"], int) or isinstance(s["block_size"], bool)
                              or not 1 <= s["block_size"] <= 4096):
        raise PlanError(f"{where}.block_size must be an integer in [1, 4096]; got {_short(s['block_size'])}")
    if "smooth_alpha" in s and s["smooth_alpha"] is not None and (
            not isinstance(s["smooth_alpha"], (int, float)) or isinstance(s["smooth_alpha"], bool)
            or not 0 <= s["smooth_alpha"] <= 1):
        raise PlanError(f"{where}.smooth_alpha must be null (searched) or a number in [0, 1]; "
                        f"got {_short(s['smooth_alpha'])}")
    if "zero_point" in s and s["zero_point"] not in ("float", "integer", "byte"):
        raise PlanError(f"{where}.zero_point must be float, integer or byte (asymmetric int weights: integer zero "
                        f"points export to GPTQ/compressed-tensors layouts, byte ones take one byte each); got "
                        f"{_short(s['zero_point'])}")
    if "codebook_granularity" in s and s["codebook_granularity"] not in ("per_tensor", "per_channel"):
        raise PlanError(f"{where}.codebook_granularity must be per_tensor or per_channel (one learned code book for "
                        f"the weight or one per output channel, lut4 only); got {_short(s['codebook_granularity'])}")
    if s.get("awq") and s.get("smoothquant"):
        raise PlanError(f"{where}: awq and smoothquant both choose per-channel scales; pick one")
    if "observer" in s and not (isinstance(s["observer"], str) and s["observer"] in OBSERVERS):
        raise PlanError(f"{where}.observer must be one of {sorted(OBSERVERS)}; got {_short(s['observer'])}")


def _short(value, limit: int = 60) -> str:
    """repr of a bad value, cut short (a plan may hold a huge integer or a long list)."""
    try:
        text = repr(value)
    except ValueError:  # ints beyond Python's digit limit for str()
        return f"an integer of about {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def resolve(plan: dict, name: str) -> dict:
    """The scheme of module ``name``: defaults, then the plan's default, then matching overrides in order."""
    scheme = dict(DEFAULTS)
    scheme.update(plan["default"])
    for o in plan["overrides"]:
        if fnmatch.fnmatchcase(name, o["pattern"]):
            scheme.update({k: v for k, v in o.items() if k != "pattern"})
    return scheme


def build_quantizers(scheme: dict):
    """(weight quantizer or None, activation quantizer or None) for a resolved scheme."""
    def make(side: str, granularity: str):
        found = lookup(scheme[side])
        if found is None:
            return None
        q_cls, cfg = found
        kwargs = dict(group_size=scheme["group_size"], dtype=scheme["dtype"], granularity=granularity)
        if issubclass(cfg, BlockScaledConfig):  # the block is the format's: 32 (MX) or 16 (nvfp4) values per scale
            block = cfg.block
            if scheme["group_size"] not in (block, DEFAULTS["group_size"]) or granularity != "per_group":
                raise PlanError(f"{scheme[side]} shares one scale per block of {block} values: group_size must be "
                                f"{block} (or left out) and the granularity per_group; got group_size="
                                f"{scheme['group_size']}, granularity {granularity}")
            kwargs["group_size"] = block
            if side == "wq" and scheme["algorithm"] != "rtn":
                raise PlanError(f"{scheme[side]}: {scheme['algorithm']} does not take block-scaled formats yet (their "
                                f"scale bytes are chosen by the format's rule); use round to nearest")
        if side == "wq" and scheme[side] == "lut4":
            kwargs["codebook_granularity"] = scheme["codebook_granularity"]
        if side == "wq":
            kwargs["clip_search"] = scheme["clip_search"]
            kwargs["zero_opt"] = scheme["zero_opt"]
            kwargs["scale_dtype"] = scheme["scale_dtype"]
        if scheme[side].startswith("int"):
            kwargs["symmetric"] = scheme["symmetric"]
            if side == "wq" and scheme["zero_point"] != "float" and not scheme["symmetric"]:
                kwargs["zero_point"] = scheme["zero_point"]  # symmetric layers have none
        return q_cls(cfg(**kwargs))

    if scheme["skip"]:
        return None, None
    wq, aq = make("wq", scheme["granularity"]), make("aq", scheme["act_granularity"])
    if scheme["act_int8"] and wq is not None:
        _check_act_int8(scheme, wq, aq)
    return wq, aq


def _check_act_int8(scheme: dict, wq, aq) -> None:
    """act_int8 layers: weights on an integer grid whose groups hold whole activation blocks of 32 (or
    halves of them), no "aq"."""
    if wq.fmt not in INT8_ACT_FORMATS:
        raise PlanError(f"act_int8 computes with weights whose values are an integer grid "
                        f"({', '.join(INT8_ACT_FORMATS)}); got wq {scheme['wq']} ({wq.fmt})")
    group = wq.config.op_group_size
    if 0 < group and group % INT8_ACT_BLOCK and group != INT8_ACT_BLOCK // 2:
        raise PlanError(f"act_int8 quantizes activations per block of 32 values: the weight's group_size must be a "
                        f"multiple of 32, 16 (two groups per block) or the granularity per_channel/per_tensor; "
                        f"got {group}")
    if aq is not None:
        raise PlanError(f"act_int8 quantizes the activations itself (int8 per block of 32); leave 'aq' unset, got "
                        f"{scheme['aq']}")


@dataclass
class LayerReport:
    name: str
    scheme: str
    shape: tuple
    bits_per_weight: float
    bytes_before: int
    bytes_after: int
    sqnr_db: float


@dataclass
class PlanReport:
    layers: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    finetune: Optional[dict] = None  # losses of the scale fine-tuning, when the plan asked for it

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    def to_dict(self) -> dict:
        out = {"layers": [asdict(r) for r in self.layers], "skipped": self.skipped,
               "total": {"bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                         "compression": self.bytes_before / max(self.bytes_after, 1)}}
        if self.finetune is not None:
            out["finetune"] = self.finetune
        return out

    def format_table(self) -> str:
        lines = [f"{'layer':<48} {'scheme':<22} {'bits/w':>7} {'before':>10} {'after':>10} {'SQNR dB':>8}"]
        for r in self.layers:
            lines.append(f"{r.name:<48} {r.scheme:<22} {r.bits_per_weight:>7.3f} {r.bytes_before:>10} "
                         f"{r.bytes_after:>10} {r.sqnr_db:>8.2f}")
        lines.append(f"{'total':<48} {'':<22} {'':>7} {self.bytes_before:>10} {self.bytes_after:>10} "
                     f"({self.bytes_before / max(self.bytes_after, 1):.2f}x smaller)")
        return "\n".join(lines)


def _weight_label(s: dict) -> str:
    w = s["wq"] + ("" if s["symmetric"] or not s["wq"].startswith("int") else "a")
    if s["wq"].startswith("mx"):
        return f"w{w}/g{MX_BLOCK}"
    if s["wq"] == "nvfp4":
        return f"w{w}/g{NVFP4_BLOCK}"
    g = {"per_tensor": "t", "per_channel": "c"}.get(s["granularity"], str(s["group_size"]))
    return f"w{w}/g{g}"


def _scheme_label(s: dict) -> str:
    act = "float" if s["aq"] in FLOAT_NAMES else s["aq"]
    extra = "".join(f" {k}" for k in ("awq", "smoothquant") if s.get(k))
    extra += " gptq" if s.get("algorithm") == "gptq" else ""
    return f"{_weight_label(s)} a{act}{extra}"


def _sqnr_db(w: torch.Tensor, deq: torch.Tensor) -> float:
    w = w.detach().to(torch.float32)
    noise = (w - deq.to(torch.float32)).pow(2).sum().item()
    signal = w.pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _linear_names(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]


def _embedding_names(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Embedding, QuantEmbedding))]


def _names_embeddings(pattern: str) -> bool:
    """Embeddings are quantized only by overrides that name them: a pattern of wildcards alone
    ("*") keeps meaning "every linear layer", as it did before embeddings could be quantized."""
    return pattern.strip("*?") != ""


def unmatched_patterns(model: nn.Module, plan: dict) -> list:
    """[(index, pattern)] of the plan's overrides whose pattern matches no linear layer or
    embedding of ``model`` (a typo, or a name scheme of another architecture: Llama's attention
    is ``self_attn``)."""
    names = _linear_names(model) + _embedding_names(model)
    return [(i, o["pattern"]) for i, o in enumerate(plan["overrides"])
            if not any(fnmatch.fnmatchcase(n, o["pattern"]) for n in names)]


def plan_embeddings(model: nn.Module, plan: dict) -> dict:
    """{module name: resolved scheme} for every nn.Embedding the plan quantizes: those an override
    names (its pattern matches and is not only wildcards), starting from "default" as linears do,
    unless the result keeps them float (``wq`` none or ``skip``). Only the weight keys apply
    (round to nearest with ``zero_opt`` / ``clip_search``; activation and calibration keys are
    for linears)."""
    out = {}
    for n in _embedding_names(model):
        if not any(_names_embeddings(o["pattern"]) and fnmatch.fnmatchcase(n, o["pattern"])
                   for o in plan["overrides"]):
            continue
        s = resolve(plan, n)
        wq, _ = build_quantizers(s)
        if wq is not None:
            out[n] = s
    return out


def tied_heads(model: nn.Module, embeddings: dict, plan: dict) -> dict:
    """{linear name: embedding name} for linears (an LM head) whose weight is the same tensor as
    a planned embedding's: they compute with the embedding's packed table (TiedQuantLinear). A
    rotated plan unties the head first, so it has none."""
    if plan.get("rotation", "none") != "none" or not embeddings:
        return {}
    weights = {id(model.get_submodule(n).weight): n for n in embeddings
               if isinstance(model.get_submodule(n), nn.Embedding)}
    return {n: weights[id(m.weight)] for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m.weight) in weights}


def plan_layers(model: nn.Module, plan: dict, strict: bool = False) -> dict:
    """{module name: resolved scheme} for every nn.Linear / QuantLinear the plan quantizes with
    codes of its own (a head tied to a planned embedding shares the embedding's instead: see
    :func:`tied_heads`). An override that matches no layer warns, or raises PlanError with
    ``strict``. Touches nothing."""
    names = _linear_names(model)
    unmatched = unmatched_patterns(model, plan)
    if unmatched and strict:
        raise PlanError("plan patterns match no linear layer of this model: "
                        + ", ".join(f"overrides[{i}] {p!r}" for i, p in unmatched)
                        + (f" (layer names look like {names[0]!r})" if names else ""))
    for i, p in unmatched:
        warnings.warn(f"plan overrides[{i}] pattern {p!r} matches no linear layer", stacklevel=3)
    tied = tied_heads(model, plan_embeddings(model, plan), plan)
    out = {}
    for n in names:
        s = resolve(plan, n)
        wq, _ = build_quantizers(s)  # raises on configs that cannot be built, before any layer changes
        if wq is not None and n not in tied:
            out[n] = s
    return out


def apply_plan(model: nn.Module, plan: Union[str, os.PathLike, dict],
               calibration_batches: Optional[Iterable] = None,
               forward_fn: Optional[Callable[[nn.Module, object], object]] = None,
               quantize_weights: bool = True, progress: Optional[Callable] = None,
               strict: bool = False, block_hooks: Optional[tuple] = None) -> PlanReport:
    """Replace the model's nn.Linear layers by QuantLinear as the plan says; returns a report.

    The plan is validated and every quantizer built before any layer is replaced.
    ``calibration_batches`` (with ``forward_fn(model, batch)``, default ``model(batch)``) are run
    when some layer asks for ``act_static``, ``gptq``, ``awq`` or ``smoothquant``; the last three
    quantize the model block by block (alphaquant.algorithms.sequential), and their folded
    scaling changes the float norms/linears in front of the quantized layers (in the state_dict
    that save_quantized writes). ``quantize_weights=False`` builds the structure only (empty
    packed buffers), to load a saved checkpoint into. ``progress`` wraps an iterable (e.g. tqdm)
    to show progress over the layers. A plan with ``"rotation": "hadamard"`` rotates the model
    first (its float tensors change, its function does not; undone if the plan fails).
    ``block_hooks`` (before(i, block), after(i, block)) go to the block-by-block pipeline of a
    calibrated plan (alphaquant.algorithms.sequential): blocks may then stay on the meta device
    until their turn (streaming from disk, alphaquant.streaming_calibrated).
    """
    from .algorithms.sequential import needs_calibration, quantize_sequential

    plan = load_plan(plan)
    layers = plan_layers(model, plan, strict=strict)
    embeddings = plan_embeddings(model, plan)
    tied = tied_heads(model, embeddings, plan)
    for head in tied:
        head_scheme = resolve(plan, head)
        if head_scheme["act_static"] and head_scheme["aq"] not in FLOAT_NAMES:
            raise PlanError(f"{head} is tied to the quantized embedding {tied[head]} and asks for act_static; a tied "
                            f"head takes dynamic activation scales only (drop act_static for it, or keep the "
                            f"embedding float)")
        if head_scheme["act_int8"]:  # it computes with the embedding's table: that must suit the path
            table_wq, _ = build_quantizers(embeddings[tied[head]])
            if not int8_act_takes(table_wq.fmt, table_wq.config.op_group_size):
                raise PlanError(f"{head} is tied to the quantized embedding {tied[head]} and asks for act_int8, which "
                                f"computes with weights of {', '.join(INT8_ACT_FORMATS)} in groups of 16, a multiple "
                                f"of 32, or per channel; the embedding is {table_wq.fmt} with group_size "
                                f"{table_wq.config.op_group_size} (change the embedding's scheme, or drop act_int8 "
                                f"for {head})")
    static = [n for n, s in layers.items() if s["act_static"] and s["aq"] not in FLOAT_NAMES]
    calibrated = [n for n, s in layers.items() if needs_calibration(s)] if quantize_weights else []
    _check_applicable(model, {**layers, **embeddings}, static if quantize_weights else [], calibration_batches,
                      check_weights=quantize_weights, calibrated=calibrated)
    tune = finetune_options(plan["finetune"]) if "finetune" in plan and quantize_weights else None
    if tune is not None:
        if calibration_batches is None:
            raise PlanError("the plan asks for finetune, which trains the scales on data, but no calibration_batches "
                            "were given")
        calibration_batches = list(calibration_batches)
        teacher = copy.deepcopy(model)  # the float model the quantized one is distilled from
    report = PlanReport()
    report.skipped = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers
                      and n not in tied]
    replaced = []  # (parent module, child name, nn.Linear) of every replaced layer, to put back on failure
    undo = []  # (tensor, original values) changed in place by folded scaling
    rotation_undo = []
    entries = {}
    fused_scales = fused_global_scales(
        [n for n, s in layers.items() if s["wq"] == "nvfp4"] if quantize_weights else [],
        lambda n: float(model.get_submodule(n).weight.detach().abs().amax()))

    def build_layer(name, linear, scheme, hessian=None):
        wq, aq = build_quantizers(scheme)
        if quantize_weights:
            if hessian is not None:
                from .algorithms.gptq import GPTQOptions, gptq_quantize

                options = GPTQOptions(damp=scheme["damp"], block_size=scheme["block_size"],
                                      act_order=scheme["act_order"], refit=scheme["refit"])
                packed = gptq_quantize(linear.weight, hessian, wq, options)
            elif name in fused_scales:  # nvfp4 siblings an engine fuses: one global scale
                packed = wq.quantize_weight(linear.weight, global_scale=fused_scales[name])
            else:
                packed = wq.quantize_weight(linear.weight)
            q = QuantLinear.from_packed(linear, packed, aq, scheme=scheme)  # keeps an input rotation
            sqnr = _sqnr_db(linear.weight, q.dequantized_weight())
        else:
            q = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, wq.fmt,
                            wq.symmetric, wq.config.op_group_size, aq, linear.weight.dtype, linear.weight.device,
                            wq.config.scale_storage_dtype, scheme=scheme,
                            input_rotation=getattr(linear, ROTATION_ATTR, None), zero_dtype=wq.config.zero_point_dtype)
            sqnr = float("nan")
        before = linear.weight.numel() * linear.weight.element_size()
        after = q.packed_weight.nbytes
        entries[name] = LayerReport(name, _scheme_label(scheme), tuple(linear.weight.shape),
                                    8.0 * after / linear.weight.numel(), before, after, sqnr)
        parent_name, _, child = name.rpartition(".")
        replaced.append((model.get_submodule(parent_name) if parent_name else model, child, linear))
        logger.debug("quantized %s: %s", name, _scheme_label(scheme))
        return q

    def build_embedding(name, embedding, scheme):
        wq, _ = build_quantizers(scheme)
        if quantize_weights:
            q = QuantEmbedding.from_embedding(embedding, wq, scheme=scheme)
            sqnr = _sqnr_db(embedding.weight, q.dequantized_weight())
        else:
            q = QuantEmbedding(embedding.num_embeddings, embedding.embedding_dim, wq.fmt, wq.symmetric,
                               wq.config.op_group_size, embedding.weight.dtype, embedding.weight.device,
                               wq.config.scale_storage_dtype, scheme=scheme,
                               padding_idx=embedding.padding_idx, zero_dtype=wq.config.zero_point_dtype)
            sqnr = float("nan")
        before = embedding.weight.numel() * embedding.weight.element_size()
        entries[name] = LayerReport(name, "embedding " + _weight_label(scheme),
                                    tuple(embedding.weight.shape), 8.0 * q.packed_weight.nbytes / embedding.weight.numel(),
                                    before, q.packed_weight.nbytes, sqnr)
        parent_name, _, child = name.rpartition(".")
        replaced.append((model.get_submodule(parent_name) if parent_name else model, child, embedding))
        return q

    def tie_head(name, linear, embedding_name):
        head_scheme = resolve(plan, name)
        _, aq = build_quantizers(head_scheme)
        head = TiedQuantLinear(model.get_submodule(embedding_name), linear.bias, aq, tied_to=embedding_name,
                               act_int8=bool(head_scheme["act_int8"]))
        parent_name, _, child = name.rpartition(".")
        replaced.append((model.get_submodule(parent_name) if parent_name else model, child, linear))
        return head

    try:
        if plan.get("rotation", "none") != "none":
            try:
                rotate_model(model, numeric=quantize_weights, undo=rotation_undo)
            except RotationError as e:
                raise PlanError(str(e)) from None
        # Embeddings first: calibrated layers then see the embeddings they will be served with.
        for name, scheme in embeddings.items():
            _set_module(model, name, build_embedding(name, model.get_submodule(name), scheme))
        for name, embedding_name in tied.items():
            _set_module(model, name, tie_head(name, model.get_submodule(name), embedding_name))
        if calibrated:
            batches = list(calibration_batches)
            forward = forward_fn or (lambda m, b: m(b))
            # Blocks streamed from disk are written and freed as they go: the source is unchanged, so
            # nothing needs undoing, and copies kept for it would hold every block in memory.
            quantize_sequential(model, layers, batches, forward, build_layer, build_quantizers,
                                progress=progress, undo=undo if block_hooks is None else [], block_hooks=block_hooks)
            calibration_batches = batches
        else:
            items = list(layers.items())
            for name, scheme in (progress(items, desc="quantizing") if progress else items):
                _set_module(model, name, build_layer(name, model.get_submodule(name), scheme))
        report.layers = [entries[n] for n in embeddings] + [entries[n] for n in layers]
        if static and quantize_weights:
            calibrate(model, [model.get_submodule(n) for n in static], calibration_batches, forward_fn)
        if tune is not None:
            try:
                report.finetune = finetune_scales(model, teacher, calibration_batches, forward_fn,
                                                  FinetuneOptions(**tune), progress=progress, undo=undo)
            except ValueError as e:
                raise PlanError(str(e)) from None
            finally:
                del teacher
    except BaseException:
        for parent, child, linear in reversed(replaced):
            setattr(parent, child, linear)
        with torch.no_grad():
            for t, old in reversed(undo):
                t.copy_(old)
        restore(rotation_undo)
        raise
    return report


def _check_applicable(model: nn.Module, layers: dict, static: list, calibration_batches, check_weights: bool,
                      calibrated: tuple = ()) -> None:
    """What can be known before the first layer changes: calibration data where the plan needs it,
    float layers only, and weights a format can hold."""
    if calibrated and calibration_batches is None:
        s = layers[calibrated[0]]
        what = "gptq" if s["algorithm"] == "gptq" else ("awq" if s["awq"] else "smoothquant")
        raise PlanError(f"{len(calibrated)} layers ask for {what} (e.g. {calibrated[0]}), which calibrates on data, "
                        f"but no calibration_batches were given")
    if static and calibration_batches is None:
        raise PlanError(f"{len(static)} layers ask for act_static (e.g. {static[0]}) but no calibration_batches "
                        f"were given")
    for name, scheme in layers.items():
        layer = model.get_submodule(name)
        if isinstance(layer, (QuantLinear, QuantEmbedding)):
            raise PlanError(f"layer {name} is already quantized; apply a plan to a float model")
        if check_weights and scheme["wq"] not in ("fp8", "fp8_e4m3", "fp8_e5m2") and layer.weight.device.type != "meta":
            # (a layer still on the meta device is loaded later, and checked then, by its loader)
            if not torch.isfinite(layer.weight.detach()).all():
                raise PlanError(f"layer {name}: the weight holds NaN or Inf, which {scheme['wq']} cannot represent "
                                f"(only fp8 formats hold them); fix the model or skip the layer")


def calibrate(model: nn.Module, layers: list, batches: Iterable, forward_fn=None) -> None:
    """Observe each layer's input over ``batches``, then freeze static activation scales."""
    hooks = []
    for layer in layers:
        layer.act_quantizer.attach_observer(OBSERVERS[layer.scheme["observer"]]())
        hooks.append(layer.register_forward_pre_hook(
            lambda mod, args: mod.act_quantizer.observer.observe(args[0])))
    try:
        with torch.no_grad():
            n = 0
            for batch in batches:
                forward_fn(model, batch) if forward_fn else model(batch)
                n += 1
        if n == 0:
            raise PlanError("calibration_batches was empty")
    finally:
        for h in hooks:
            h.remove()
    for layer in layers:
        layer.act_quantizer.calibrate_finish()
