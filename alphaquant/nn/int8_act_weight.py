"""The CPU layout a QuantLinear's int8-activation path reads, held in place of the packed buffers.

The int8-activation kernels read the weight in a layout of their own (csrc/cpu/int8_act_layout.h),
built from the packed buffers on the first such call. Keeping both would hold the weight twice.
The layout's codes give the packed rows back (``ops.int8_act_unlayout``) and its params hold the
scales (float scales; not MX / nvfp4 scale bytes), so once it is built the layer lets go of
``weight_packed`` (and ``weight_scale``) and rebuilds them from the layout whenever something asks
for one (``layer.weight_packed``, ``state_dict``, a move or dtype change, ``load_state_dict``, the
float-activation path). Zero points stay as they are.

The rebuilt tensors are checked equal to the buffers before those go. The codes
the layout cannot tell apart (E2M3's -0, whose grid value is +0's) are kept aside as a short list
of positions and codes; a weight with too many of them, or whose packed rows differ otherwise
(e.g. set padding bits), keeps its packed buffer. The packed buffer is let go only when nothing
else holds it (no other reference to the tensor or its storage, e.g. a state_dict someone kept),
so writes through such a reference still reach the weight (each buffer is judged alone). ``keep_packed_beside_layout = True`` on
a layer keeps both.
"""
from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import ops
from ..formats import NVFP4, format_bits, int8_act_takes

_PACKED, _SCALE = "weight_packed", "weight_scale"
_MAX_PATCHED = 1 / 64  # codes the layout cannot give back, as a share of the weight's, beyond which both are kept


class Int8ActLayout(NamedTuple):
    packed: Optional[torch.Tensor]  # the packed buffer it was built from; None once that is let go
    scale: Optional[torch.Tensor]  # the scale buffer, likewise
    zero_point: Optional[torch.Tensor]
    versions: tuple  # of packed, scale, zero point (as built or rebuilt)
    codes: torch.Tensor  # what linear_int8_act reads
    params: torch.Tensor
    patch: Optional[tuple]  # (flat positions int64, codes uint8) the layout gives back wrong, or None
    rebuilds_packed: bool  # int8_act_unlayout (and the patch) give the packed bytes back exactly
    rebuilds_scale: bool  # the params' scales give the scale buffer back exactly


def buffer_versions(*tensors) -> tuple:
    """Version counters of tensors (-1: None; -2: made under inference_mode, which has none)."""
    return tuple(-1 if t is None else -2 if t.is_inference() else t._version for t in tensors)


def _held_elsewhere(buffers: dict, name: str) -> bool:
    """Whether something besides ``buffers`` refers to the tensor ``buffers[name]`` or shares its storage."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return True  # cannot tell: keep it
    # references: the dict and getrefcount's argument; storage users: the tensor and the storage
    # object made here to ask
    return sys.getrefcount(buffers[name]) > 2 or use_count(buffers[name].untyped_storage()._cdata) > 2


def int8_act_call_applies(module: nn.Module, x: torch.Tensor, fmt: str, group_size: int) -> bool:
    """Whether a call of ``module`` (QuantLinear, TiedQuantLinear: act_int8, act_quantizer, bias) on
    ``x`` takes the int8-activation path: CPU, no gradient needed (linear_int8_act has none), a
    format and group size the path takes."""
    if not module.act_int8 or x.device.type != "cpu" or module.act_quantizer is not None:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (module.bias is not None and module.bias.requires_grad)):
        return False
    return int8_act_takes(fmt, group_size)


class Int8ActWeight:
    """Mixin of QuantLinear (before PackedWeightModule in its bases): the CPU layout and the
    packed buffer it stands in for."""

    keep_packed_beside_layout = False
    _int8_act_weight: Optional[Int8ActLayout] = None
    _in_layout: tuple = ()  # names of the buffers let go (weight_packed, weight_scale): the layout holds them

    def _init_int8_act_weight(self) -> None:
        self._int8_act_weight = None
        self._in_layout = ()

    def _int8_act_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, params) for linear_int8_act, rebuilt when a weight buffer changed (in place: its
        version; replaced, e.g. by a move: its identity; loaded into: load_state_dict drops it).
        Buffers made under torch.inference_mode have no version counter: for them only
        replacement and load_state_dict are seen."""
        layout = self._int8_act_weight
        if self._in_layout:
            wz = self.weight_zero_point
            scale_same = _SCALE in self._in_layout or (layout.scale is self.weight_scale
                                                       and layout.versions[1] == buffer_versions(self.weight_scale)[0])
            if scale_same and layout.zero_point is wz and layout.versions[2] == buffer_versions(wz)[0]:
                return layout.codes, layout.params
            self._restore_buffers()  # a scale or zero point changed: params are rebuilt from the buffers
            layout = self._int8_act_weight
        wp, ws, wz = self.weight_packed, self.weight_scale, self.weight_zero_point
        versions = buffer_versions(wp, ws, wz)
        if (layout is None or layout.packed is not wp or layout.scale is not ws or layout.zero_point is not wz
                or layout.versions != versions):
            codes, params = ops.int8_act_layout(wp, ws, wz, self.fmt, symmetric=self.symmetric,
                                                group_size=self.group_size, k=self.in_features)
            layout = self._int8_act_weight = Int8ActLayout(wp, ws, wz, versions, codes, params,
                                                           *self._how_to_rebuild(codes, params, wp, ws))
        codes, params, exact = layout.codes, layout.params, layout.rebuilds_packed
        del wp, ws, layout  # no references of ours to the buffers left but the module's and the layout's
        if exact and not self.keep_packed_beside_layout and not torch.compiler.is_compiling():
            self._let_go_of_buffers()
        return codes, params

    def _how_to_rebuild(self, codes: torch.Tensor, params: torch.Tensor, wp: torch.Tensor, ws: torch.Tensor) -> tuple:
        """(patch, rebuilds_packed, rebuilds_scale) for Int8ActLayout."""
        if self.keep_packed_beside_layout or wp.device.type != "cpu":
            return None, False, False
        rebuilds_scale = ws.is_floating_point() and ws.dim() == 2 and self.fmt != NVFP4 and torch.equal(
            self._scale_from_params(params, ws.shape, ws.dtype), ws)
        back = self._unlayout(codes, None)
        if torch.equal(back, wp):
            return None, True, rebuilds_scale
        bits, k = format_bits(self.fmt), self.in_features
        want, got = ops.unpack(wp, bits, k).flatten(), ops.unpack(back, bits, k).flatten()
        where = (want != got).nonzero().squeeze(1)
        if where.numel() > _MAX_PATCHED * want.numel():
            return None, False, False
        patch = (where, want[where].clone())
        return patch, torch.equal(self._unlayout(codes, patch), wp), rebuilds_scale

    def _scale_from_params(self, params: torch.Tensor, shape, dtype) -> torch.Tensor:
        """The scale buffer [rows, groups] (or [1, 1] per tensor) from the layout's params [tiles,
        groups, P, 16], whose first entry per row and group is the scale."""
        tiles, groups = params.shape[0], params.shape[1]
        s = params[:, :, 0, :].permute(0, 2, 1).reshape(tiles * 16, groups)[: self.out_features]
        return s[: shape[0], : shape[1]].reshape(shape).to(dtype)

    def _unlayout(self, codes: torch.Tensor, patch: Optional[tuple]) -> torch.Tensor:
        packed = ops.int8_act_unlayout(codes, self.fmt, n=self.out_features, k=self.in_features)
        if patch is None:
            return packed
        bits, k = format_bits(self.fmt), self.in_features
        unpacked = ops.unpack(packed, bits, k)
        unpacked.view(-1)[patch[0]] = patch[1]
        return ops.pack(unpacked, bits)

    def _let_go_of_buffers(self) -> None:
        layout = self._int8_act_weight
        self._int8_act_weight = layout._replace(packed=None, scale=None)
        del layout
        names = (_PACKED, _SCALE) if self._int8_act_weight.rebuilds_scale else (_PACKED,)
        if self._buffers[_PACKED].device.type != "cpu" or _held_elsewhere(self._buffers, _PACKED):
            names = ()
        elif _SCALE in names and _held_elsewhere(self._buffers, _SCALE):
            names = (_PACKED,)
        self._int8_act_weight = self._int8_act_weight._replace(
            packed=None if _PACKED in names else self._buffers[_PACKED],
            scale=None if _SCALE in names else self._buffers[_SCALE])
        if names:
            self._buffer_order = list(self._buffers)
            ws = self._buffers[_SCALE]
            self._buffer_meta = (tuple(ws.shape), ws.dtype)
            del ws
            for name in names:
                del self._buffers[name]
            self._in_layout = names

    def _rebuilt(self, name: str) -> torch.Tensor:
        layout = self._int8_act_weight
        if name == _PACKED:
            return self._unlayout(layout.codes, layout.patch)
        shape, dtype = self._buffer_meta
        return self._scale_from_params(layout.params, shape, dtype)

    def _restore_buffers(self) -> None:
        """The buffers let go back in the module (in their order), from the layout (which stays
        valid for them)."""
        with torch.inference_mode(False):  # normal tensors: load_state_dict may write into them later
            rebuilt = {name: self._rebuilt(name) for name in self._in_layout}
        items = [(n, rebuilt[n] if n in rebuilt else self._buffers[n]) for n in self._buffer_order
                 if n in rebuilt or n in self._buffers]
        items += [(n, t) for n, t in self._buffers.items() if n not in self._buffer_order]
        self._buffers.clear()
        self._buffers.update(items)
        self._in_layout = ()
        layout = self._int8_act_weight
        wp, ws = self._buffers[_PACKED], self._buffers[_SCALE]
        # the rebuilt tensors' versions; a buffer that stayed keeps the version the layout was built from
        versions = tuple(buffer_versions(t)[0] if name in rebuilt else v
                         for name, t, v in zip((_PACKED, _SCALE), (wp, ws), layout.versions)) + layout.versions[2:]
        self._int8_act_weight = layout._replace(packed=wp, scale=ws, versions=versions)

    def __getattr__(self, name: str):
        if name in self._in_layout:
            self._restore_buffers()
            return self._buffers[name]
        return nn.Module.__getattr__(self, name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._in_layout:
            self._restore_buffers()  # then replaced as usual: the layout is rebuilt from the new tensor
        nn.Module.__setattr__(self, name, value)

    def _apply(self, fn, recurse=True):
        if self._in_layout:
            self._restore_buffers()
        self._int8_act_weight = None  # moved or converted buffers: the layout is rebuilt from them
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        if self._in_layout:
            self._restore_buffers()
        self._int8_act_weight = None  # copied into in place (not seen by a version under inference_mode)
        return super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in self._in_layout:  # fresh tensors for the state_dict, not kept (the first buffers)
            destination[prefix + name] = self._rebuilt(name)
        super()._save_to_state_dict(destination, prefix, keep_vars)
