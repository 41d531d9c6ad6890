"""Base configuration and quantizer classes shared by every format."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from .. import ops
from ..formats import decode_zero_points, encode_zero_points, format_bits, zero_grid
from .._logging import logger
from ..layout import GRANULARITIES, op_group_size, scale_shape, to_groups
from ..packed import PackedTensor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_GROUP_SIZE = 1 << 30


@dataclass
class QuantizerConfig:
    """Fields every quantizer takes.

    group_size: values per scale along the last dimension (per_group).
    dtype: dtype that dequantized values come back in ("float32", "float16", "bfloat16").
    granularity: "per_group", "per_channel" (one scale per row: output channel of a weight,
      token of an activation) or "per_tensor".
    stochastic: stochastic rounding (unbiased: rounds up with probability equal to the discarded
      fraction), e.g. for training.
    seed: None (default) draws fresh random bits from torch's generator on every call, so
      ``torch.manual_seed`` repeats a run; an int gives the same rounding on every call.
    clip_search: for weights, search per group the clipping of the range that minimizes the
      squared quantization error (quantize_weight only; costs ~20 fake-quantizations).
    zero_opt: for asymmetric integer weights, refine zero points by l_p (p < 1) error
      minimization (HQQ's half-quadratic method); quantize_weight only. Not together with
      clip_search (both choose the range).
    scale_dtype: storage of weight scales and zero points ("float16" halves their overhead:
      int4 group 64 asymmetric takes 4.5 bits per weight instead of 5); values are quantized
      with the rounded scales, so what is stored is exactly what is computed with.
    """

    group_size: int = 128
    dtype: str = "bfloat16"
    granularity: str = "per_group"
    stochastic: bool = False
    seed: Optional[int] = None
    clip_search: bool = False
    zero_opt: bool = False
    scale_dtype: str = "float32"

    def __post_init__(self):
        name = type(self).__name__
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or not 0 < self.group_size <= MAX_GROUP_SIZE:
            raise ValueError(f"{name}.group_size must be a positive int (at most {MAX_GROUP_SIZE}); got {self.group_size!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"{name}.dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"{name}.granularity must be one of {GRANULARITIES}; got {self.granularity!r}")
        if self.scale_dtype not in DTYPES:
            raise ValueError(f"{name}.scale_dtype must be one of {sorted(DTYPES)}; got {self.scale_dtype!r}")
        for key in ("stochastic", "clip_search", "zero_opt"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{name}.{key} must be True or False; got {getattr(self, key)!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"{name}.seed must be None (fresh randomness from torch's generator on every call) "
                             f"or an int in [0, 2**63); got {self.seed!r}")
        if self.clip_search and self.zero_opt:
            raise ValueError(f"{name}: clip_search and zero_opt both choose the weight range (clipping by error "
                             f"search vs. l_p zero-point refinement); pick one")
        if self.zero_opt and not self.asymmetric_int:
            raise ValueError(f"{name}.zero_opt refines zero points, which only asymmetric integer formats have "
                             f"(an int config with symmetric=False)")

    @property
    def asymmetric_int(self) -> bool:
        """Whether the format is an integer format with a zero point."""
        return False

    @property
    def integer_zero_point(self) -> bool:
        """Whether weight zero points are rounded to integers in the code range (IntConfig.zero_point)."""
        return False

    @property
    def byte_zero_point(self) -> bool:
        """Whether weight zero points are stored as one byte on a grid (IntConfig.zero_point "byte")."""
        return False

    @property
    def zero_point_dtype(self) -> torch.dtype:
        """dtype of stored weight zero points: uint8 codes for one-byte ones, else scale_dtype's."""
        return torch.uint8 if self.byte_zero_point else DTYPES[self.scale_dtype]

    @property
    def scale_storage_dtype(self) -> torch.dtype:
        """dtype of stored weight scales (MX formats: uint8 E8M0 codes)."""
        return DTYPES[self.scale_dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def op_group_size(self) -> int:
        """The ops' encoding of the granularity: -1 per tensor, 0 per channel, else the group size."""
        return op_group_size(self.granularity, self.group_size)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class BlockScaledConfig(QuantizerConfig):
    """Fields of a format whose block and scale rule are its own (MX, nvfp4): group_size must be the
    block, the granularity per group; scales are chosen by the rule and stored as bytes."""

    block = 0  # values per scale byte (a class constant, not a field)
    scale_bytes = ""  # what the stored scale bytes are, for messages

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.group_size != self.block or self.granularity != "per_group":
            raise ValueError(f"{name}: the format shares one scale per block of {self.block} values: group_size must "
                             f"be {self.block} and granularity per_group; got group_size={self.group_size!r}, "
                             f"granularity={self.granularity!r}")
        if self.clip_search or self.zero_opt:
            raise ValueError(f"{name}: the block scale is fixed by the format's rule; clip_search and zero_opt do "
                             f"not apply")
        if self.scale_dtype != "float32":
            raise ValueError(f"{name}: scales are stored as {self.scale_bytes}; scale_dtype does not apply (leave it "
                             f"float32); got {self.scale_dtype!r}")

    @property
    def scale_storage_dtype(self) -> torch.dtype:
        return torch.uint8


class BaseQuantizer:
    """Quantizes weights to packed storage and activations to fake-quantized tensors.

    Without an observer, scales are dynamic (from each group's min/max). With one attached,
    ``observer.observe(x)`` collects statistics and :meth:`calibrate_finish` freezes static
    scales that every later call uses.
    """

    config_class = QuantizerConfig

    def __init__(self, config: Optional[QuantizerConfig] = None):
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}; got {type(config).__name__}")
        self.config = config
        self.observer = None
        self.static_scale: Optional[torch.Tensor] = None
        self.static_zero_point: Optional[torch.Tensor] = None

    # ---- what subclasses define
    @property
    def fmt(self) -> str:
        raise NotImplementedError

    @property
    def symmetric(self) -> bool:
        return True

    # ---- observers and static scales
    def attach_observer(self, observer) -> None:
        """Attach an observer; it is set up to collect statistics for this quantizer's format."""
        observer.configure(self.fmt, self.symmetric, self.config.granularity, self.config.group_size)
        self.observer = observer

    def calibrate_finish(self) -> None:
        """Freeze scales from the observer's statistics (static quantization from now on)."""
        if self.observer is None:
            raise RuntimeError("calibrate_finish() needs an observer: call attach_observer() first")
        self.static_scale, self.static_zero_point = self.observer.compute_scales()
        logger.debug("%s: static scales frozen, shape %s", type(self).__name__, tuple(self.static_scale.shape))

    def set_static_scales(self, scale: torch.Tensor, zero_point: Optional[torch.Tensor] = None) -> None:
        """Use given scales (float, > 0) from now on; shapes as an observer would produce them."""
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("static scales must be finite and > 0")
        if not self.symmetric and zero_point is None:
            raise ValueError("asymmetric quantizers need a zero_point with their static scale")
        self.static_scale = scale
        self.static_zero_point = None if zero_point is None else torch.as_tensor(zero_point, dtype=torch.float32)

    def _rounding_seed(self) -> int:
        """The config's seed, or fresh bits from torch's default generator (stochastic rounding only)."""
        if not self.config.stochastic:
            return 0
        if self.config.seed is not None:
            return self.config.seed
        return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())

    @property
    def is_static(self) -> bool:
        return self.static_scale is not None

    def _static_args(self, x: torch.Tensor):
        """Static scales broadcast to the shape the ops expect for ``x``."""
        if self.static_scale is None:
            return None, None
        target = scale_shape(x.shape, self.config.op_group_size)
        try:
            s = self.static_scale.to(x.device).expand(target).contiguous()
            z = None
            if self.static_zero_point is not None and not self.symmetric:
                z = self.static_zero_point.to(x.device).expand(target).contiguous()
        except RuntimeError as e:
            raise ValueError(f"static scales of shape {tuple(self.static_scale.shape)} do not fit an input of shape "
                             f"{tuple(x.shape)} ({self.config.granularity}, group_size={self.config.group_size})") from e
        return s, z

    # ---- the two entry points: weights to packed storage, activations fake-quantized
    def quantize_weight(self, weight: torch.Tensor) -> PackedTensor:
        """Quantize a weight to packed low-bit storage (real bits/8 bytes per value plus scales)."""
        if not torch.is_floating_point(weight):
            raise TypeError(f"quantize_weight expects a floating tensor; got {weight.dtype}")
        w = weight.detach()
        s, z = self._static_args(w)
        c = self.config
        plain = (not (c.clip_search or c.zero_opt or c.integer_zero_point or c.byte_zero_point)
                 and c.scale_dtype == "float32")
        if s is None and not plain:
            s, z = self.choose_weight_scales(w)
        return self.pack_with_scales(w, s, z)

    def choose_weight_scales(self, weight: torch.Tensor, group_size: Optional[int] = None):
        """(scale, zero point or None) float32 for ``weight`` as :meth:`quantize_weight` picks
        them (min/max, clip_search or zero_opt), already rounded to ``scale_dtype``.

        ``group_size`` overrides the config's op group size (-1, 0 or > 0), e.g. to choose the
        scales of one group of columns at a time (GPTQ)."""
        w = weight.detach()
        gs = self.config.op_group_size if group_size is None else group_size
        if self.config.clip_search:
            from .clip_search import mse_clip_scales

            s, z = mse_clip_scales(w, self.fmt, self.symmetric, gs)
        elif self.config.zero_opt:
            from .zero_opt import optimize_zero_points

            s, z = optimize_zero_points(w, self.fmt, gs)
        else:
            _, s, z = ops.quantize(w, self.fmt, symmetric=self.symmetric, group_size=gs)
        z = z if (z is not None and z.numel() and not self.symmetric) else None
        if z is not None and self.config.integer_zero_point:
            # An integer zero point must be a code: ranges that do not hold 0 (min > 0 or max < 0)
            # would be clipped by clamping it, so those groups (all of them for min/max) get the
            # range widened to hold 0, as GPTQ does.
            s0, z0 = _zero_inclusive_scales(w, gs, 2 ** format_bits(self.fmt) - 1, s.shape)
            outside = (z < -0.5) | (z > 2 ** format_bits(self.fmt) - 0.5)
            if not (self.config.clip_search or self.config.zero_opt):
                outside = torch.ones_like(outside)
            s, z = torch.where(outside, s0, s), torch.where(outside, z0, z)
        if z is not None and self.config.byte_zero_point:
            s, z = _widen_into_zero_grid(s, z, format_bits(self.fmt))
            z = _grid_zero_by_error(w, s, z, format_bits(self.fmt), gs)
        return self._round_scales(s, z)

    def _round_scales(self, s: torch.Tensor, z: Optional[torch.Tensor]):
        # Round the scales to their storage dtype first and quantize with the rounded ones;
        # integer zero points are rounded into the code range (exact in every scale dtype), one-byte
        # ones onto their grid (exact in float32, which they are decoded to).
        if z is not None and self.config.integer_zero_point:
            z = z.round().clamp(0, 2 ** format_bits(self.fmt) - 1)
        if z is not None and self.config.byte_zero_point:
            s, z = _widen_into_zero_grid(s, z, format_bits(self.fmt))
            z = decode_zero_points(encode_zero_points(z, format_bits(self.fmt)), format_bits(self.fmt))
        sdt = DTYPES[self.config.scale_dtype]
        if sdt == torch.float32:
            return s, z
        s = s.clamp(min=torch.finfo(sdt).tiny).to(sdt).float()
        return s, None if z is None else z.to(sdt).float()

    def pack_with_scales(self, weight: torch.Tensor, scale: Optional[torch.Tensor],
                         zero_point: Optional[torch.Tensor] = None) -> PackedTensor:
        """Pack ``weight`` with the given scales (shaped for the config's layout); they are stored
        in ``scale_dtype`` and must be representable in it (as :meth:`choose_weight_scales` gives)."""
        w = weight.detach()
        sdt = DTYPES[self.config.scale_dtype]
        s, z = scale, zero_point
        if s is not None:  # None: the kernel picks min/max scales itself (float32 storage only)
            s, z = self._round_scales(s.float(), None if z is None else z.float())
            s, z = s.contiguous(), None if z is None else z.contiguous()
        if z is not None and self.config.byte_zero_point:
            z = encode_zero_points(z, format_bits(self.fmt))  # exact: z is on the grid
        packed, scale, zero = ops.quantize(w, self.fmt, symmetric=self.symmetric, group_size=self.config.op_group_size,
                                           scale=s, zero_point=z,
                                           stochastic=self.config.stochastic, seed=self._rounding_seed())
        zero = (z if z is not None and z.dtype == torch.uint8 else zero.to(sdt)) if zero.numel() else None
        return PackedTensor(packed, scale.to(sdt), zero, self.fmt, self.symmetric,
                            self.config.op_group_size, tuple(w.shape), self.config.torch_dtype)

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize (one fused kernel) and return in the config's dtype; straight-through gradient."""
        if not torch.is_floating_point(x):
            raise TypeError(f"quantize_activation expects a floating tensor; got {x.dtype}")
        s, z = self._static_args(x)
        y = ops.fake_quantize(x, self.fmt, symmetric=self.symmetric, group_size=self.config.op_group_size,
                              scale=s, zero_point=z, stochastic=self.config.stochastic, seed=self._rounding_seed())
        return y.to(self.config.torch_dtype)

    def dequantize(self, packed: PackedTensor) -> torch.Tensor:
        return packed.dequantize(self.config.torch_dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def _zero_inclusive_scales(w: torch.Tensor, group_size: int, qmax: int, shape) -> tuple:
    """Asymmetric (scale, zero point) per group from the group's range widened to hold 0, so that
    the zero point -min / scale lies in [0, qmax]; ``shape`` is the layout's scale shape."""
    rows, k = w.reshape(-1, w.shape[-1]).shape
    x = w.reshape(rows, k).float()
    if group_size > 0:
        glen = min(group_size, k)
        groups = -(-k // glen)
        x = torch.nn.functional.pad(x, (0, groups * glen - k)).reshape(rows, groups, glen)  # zeros change nothing
    elif group_size == 0:
        x = x.reshape(rows, 1, k)
    else:
        x = x.reshape(1, 1, -1)
    mn, mx = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    scale = (mx - mn) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.reshape(shape), (-mn / scale).reshape(shape)


def _widen_into_zero_grid(s: torch.Tensor, z: torch.Tensor, bits: int) -> tuple:
    """(scale, zero point clamped into the one-byte grid's span, alphaquant.formats.zero_grid).
    A zero point beyond it (a range far from 0) is clamped and the scale widened so that the range
    the group's codes spanned, [-z s, (qmax - z) s], still fits."""
    _, low, high = zero_grid(bits)
    qmax = 2 ** bits - 1
    s = torch.where(z < low, (qmax - z) * s / (qmax - low), torch.where(z > high, z * s / high, s))
    return s, z.clamp(low, high)


def _grid_zero_by_error(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``z`` (inside the grid's span) moved to one of the two grid points around it: the one whose
    codes reconstruct the group with the smaller squared error (chosen on calibration-free weight
    error; nearest rounding costs more perplexity on SmolLM2's calibration text)."""
    step, low, _ = zero_grid(bits)
    c = (z - low) / step
    lo, hi = c.floor() * step + low, c.ceil() * step + low
    if group_size == -1:
        return decode_zero_points(encode_zero_points(z, bits), bits)
    qmax = float(2 ** bits - 1)
    k = w.shape[-1]
    w2 = w.reshape(-1, k)
    rows = w2.shape[0]
    s2, lo2, hi2 = s.reshape(rows, -1), lo.reshape(rows, -1), hi.reshape(rows, -1)
    block = max(1, (1 << 17) // k)  # rows per block: its temporaries stay small
    out = []
    for r in range(0, rows, block):
        wg = to_groups(w2[r:r + block].float(), group_size)
        valid = ~torch.isnan(wg)
        wg = torch.nan_to_num(wg)
        sb = s2[r:r + block].unsqueeze(-1)

        def err(zb):
            zb = zb.unsqueeze(-1)
            d = torch.where(valid, wg - (torch.round(wg / sb + zb).clamp(0, qmax) - zb) * sb, 0)
            return (d * d).sum(-1)

        lb, hb = lo2[r:r + block], hi2[r:r + block]
        out.append(torch.where(err(hb) < err(lb), hb, lb))
    return torch.cat(out).reshape(z.shape)
