"""The quantizer registry: scheme names used by plans -> (quantizer class, config class).

``create_quantizer_from_scheme`` hands out real dataclass config classes: the registered config
class itself, or a subclass of it whose defaults carry the scheme's dtype and the format a name
fixes (``fp8_e5m2``), so ``dataclasses.fields``, ``issubclass`` and ``isinstance`` work on them.
"""
from __future__ import annotations

import dataclasses
import reprlib
from typing import Optional

from .base import QuantizerConfig
from .codebook import CodebookConfig, CodebookQuantizer
from .fp4 import FP4Config, FP4Quantizer
from .fp8 import FP8Config, FP8Quantizer
from .int_quantizers import (INT2Config, INT2Quantizer, INT3Config, INT3Quantizer, INT4Config, INT4Quantizer,
                             INT5Config, INT5Quantizer, INT6Config, INT6Quantizer, INT8Config, INT8Quantizer)
from .mx import (MXFP4Config, MXFP4Quantizer, MXFP6Config, MXFP6Quantizer, MXFP8Config, MXFP8Quantizer, MXINT8Config,
                 MXINT8Quantizer)
from .nf4 import NF4Config, NF4Quantizer
from .nvfp4 import NVFP4Config, NVFP4Quantizer

# name -> (quantizer class, config class, config defaults the name fixes)
QUANTIZER_REGISTRY: dict = {
    "int2": (INT2Quantizer, INT2Config, {}),
    "int3": (INT3Quantizer, INT3Config, {}),
    "int4": (INT4Quantizer, INT4Config, {}),
    "int5": (INT5Quantizer, INT5Config, {}),
    "int6": (INT6Quantizer, INT6Config, {}),
    "int8": (INT8Quantizer, INT8Config, {}),
    "fp8": (FP8Quantizer, FP8Config, {"format": "e4m3"}),
    "fp8_e4m3": (FP8Quantizer, FP8Config, {"format": "e4m3"}),
    "fp8_e5m2": (FP8Quantizer, FP8Config, {"format": "e5m2"}),
    "fp4": (FP4Quantizer, FP4Config, {"format": "e2m1"}),
    "fp4_e2m1": (FP4Quantizer, FP4Config, {"format": "e2m1"}),
    "nf4": (NF4Quantizer, NF4Config, {"format": "nf4"}),
    "lut4": (CodebookQuantizer, CodebookConfig, {}),
    # MX block formats (OCP MX v1.0): 32 values per E8M0 scale byte
    "mxfp4": (MXFP4Quantizer, MXFP4Config, {"format": "e2m1"}),
    "mxfp4_e2m1": (MXFP4Quantizer, MXFP4Config, {"format": "e2m1"}),
    "mxfp6": (MXFP6Quantizer, MXFP6Config, {"format": "e3m2"}),
    "mxfp6_e3m2": (MXFP6Quantizer, MXFP6Config, {"format": "e3m2"}),
    "mxfp6_e2m3": (MXFP6Quantizer, MXFP6Config, {"format": "e2m3"}),
    "mxfp8": (MXFP8Quantizer, MXFP8Config, {"format": "e4m3"}),
    "mxfp8_e4m3": (MXFP8Quantizer, MXFP8Config, {"format": "e4m3"}),
    "mxfp8_e5m2": (MXFP8Quantizer, MXFP8Config, {"format": "e5m2"}),
    "mxint8": (MXINT8Quantizer, MXINT8Config, {}),
    # NVFP4: E2M1 values, an E4M3 scale byte per 16 values and a float32 global scale per tensor
    "nvfp4": (NVFP4Quantizer, NVFP4Config, {}),
}
FLOAT_NAMES = (None, "none", "float")  # keep this side in floating point

_derived_configs: dict = {}


def register_quantizer(name: str, quantizer_cls, config_cls, **defaults) -> None:
    """Make a quantizer usable by name in plans and create_quantizer_from_scheme."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, QuantizerConfig)):
        raise TypeError(f"config_cls must be a QuantizerConfig subclass; got {config_cls!r}")
    unknown = set(defaults) - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no fields {sorted(unknown)}")
    QUANTIZER_REGISTRY[name] = (quantizer_cls, config_cls, dict(defaults))


def config_with_defaults(config_cls: type, **defaults) -> type:
    """``config_cls`` itself when ``defaults`` change nothing, else a dataclass subclass (same
    name, cached) whose fields default to ``defaults``."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    changed = {k: v for k, v in defaults.items() if fields[k].default != v}
    if not changed:
        return config_cls
    key = (config_cls, tuple(sorted(changed.items())))
    if key not in _derived_configs:
        namespace = {"__annotations__": {k: fields[k].type for k in changed}, "__module__": config_cls.__module__,
                     "__qualname__": config_cls.__qualname__, "__doc__": config_cls.__doc__, **changed}
        _derived_configs[key] = dataclasses.dataclass(type(config_cls.__name__, (config_cls,), namespace))
    return _derived_configs[key]


def lookup(name: Optional[str]):
    """(quantizer class, config class with the name's fixed defaults), or None for float."""
    if name in FLOAT_NAMES:
        return None
    if not isinstance(name, str) or name not in QUANTIZER_REGISTRY:
        allowed = ", ".join(sorted(QUANTIZER_REGISTRY)) + ", none"
        raise ValueError(f"unknown quantizer {reprlib.repr(name)}; allowed: {allowed}")
    q, cfg, fixed = QUANTIZER_REGISTRY[name]
    return q, config_with_defaults(cfg, **fixed)


def create_quantizer_from_scheme(scheme: dict, dtype: str = "bfloat16"):
    """((WQ, WCfg), (AQ, ACfg)) for a scheme {'wq': name, 'aq': name}.

    WCfg/ACfg are config classes whose defaults carry ``dtype`` (and the format a name fixes), so
    ``WQ(WCfg())`` builds a ready quantizer and other fields can be passed as usual. A side named
    None/"none" gives (None, None).
    """
    out = []
    for side in ("wq", "aq"):
        found = lookup(scheme.get(side))
        if found is None:
            out.append((None, None))
        else:
            q, cfg = found
            out.append((q, config_with_defaults(cfg, dtype=dtype)))
    return tuple(out)
