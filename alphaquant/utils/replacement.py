"""The quantizer registry: scheme names used by plans -> (quantizer class, config class)."""
from __future__ import annotations

import functools
from typing import Optional

from ..quantizers import (
    FP4Config,
    FP4Quantizer,
    FP8Config,
    FP8Quantizer,
    INT2Config,
    INT2Quantizer,
    INT4Config,
    INT4Quantizer,
    INT6Config,
    INT6Quantizer,
    INT8Config,
    INT8Quantizer,
)

# name -> (quantizer class, config class, fixed config fields)
QUANTIZER_REGISTRY: dict = {
    "int2": (INT2Quantizer, INT2Config, {}),
    "int4": (INT4Quantizer, INT4Config, {}),
    "int6": (INT6Quantizer, INT6Config, {}),
    "int8": (INT8Quantizer, INT8Config, {}),
    "fp8": (FP8Quantizer, FP8Config, {"format": "e4m3"}),
    "fp8_e4m3": (FP8Quantizer, FP8Config, {"format": "e4m3"}),
    "fp8_e5m2": (FP8Quantizer, FP8Config, {"format": "e5m2"}),
    "fp4": (FP4Quantizer, FP4Config, {"format": "e2m1"}),
    "fp4_e2m1": (FP4Quantizer, FP4Config, {"format": "e2m1"}),
}
FLOAT_NAMES = (None, "none", "float")  # keep this side in floating point


def register_quantizer(name: str, quantizer_cls, config_cls, **fixed) -> None:
    """Make a quantizer usable by name in plans and create_quantizer_from_scheme."""
    QUANTIZER_REGISTRY[name] = (quantizer_cls, config_cls, fixed)


def lookup(name: Optional[str]):
    """(quantizer class, config factory) for a scheme name, or None for float."""
    if name in FLOAT_NAMES:
        return None
    if name not in QUANTIZER_REGISTRY:
        allowed = ", ".join(sorted(QUANTIZER_REGISTRY)) + ", none"
        raise ValueError(f"unknown quantizer {name!r}; allowed: {allowed}")
    q, cfg, fixed = QUANTIZER_REGISTRY[name]
    return q, functools.partial(cfg, **fixed)


def create_quantizer_from_scheme(scheme: dict, dtype: str = "bfloat16"):
    """((WQ, WCfg), (AQ, ACfg)) for a scheme {'wq': name, 'aq': name}.

    The config factories carry ``dtype`` (and a fixed format where the name implies one), so
    ``WQ(WCfg())`` builds a ready quantizer; other config fields can be passed as usual. A side
    named None/"none" gives (None, None).
    """
    out = []
    for side in ("wq", "aq"):
        found = lookup(scheme.get(side))
        if found is None:
            out.append((None, None))
        else:
            q, cfg = found
            out.append((q, functools.partial(cfg, dtype=dtype)))
    return tuple(out)
