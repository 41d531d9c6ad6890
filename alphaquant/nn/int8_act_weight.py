"""The CPU layout a QuantLinear's int8-activation path reads, held in place of the packed codes.

The int8-activation kernels read the weight in a layout of their own (csrc/cpu/int8_act_layout.h),
built from the packed buffers on the first such call. Keeping both would hold the weight's codes
twice. The layout's codes give the packed rows back (``ops.int8_act_unlayout``), so once it is
built the layer lets go of ``weight_packed`` and rebuilds it from the layout whenever something
asks for it (``layer.weight_packed``, ``state_dict``, a move or dtype change, ``load_state_dict``,
the float-activation path). Scales and zero points stay as they are (they are small).

The rebuilt bytes are checked equal to the packed ones before the packed buffer goes. The codes
the layout cannot tell apart (E2M3's -0, whose grid value is +0's) are kept aside as a short list
of positions and codes; a weight with too many of them, or whose packed rows differ otherwise
(e.g. set padding bits), keeps its packed buffer. The packed buffer is let go only when nothing
else holds it (no other reference to the tensor or its storage, e.g. a state_dict someone kept),
so writes through such a reference still reach the weight. ``keep_packed_beside_layout = True`` on
a layer keeps both.
"""
from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import ops
from ..formats import format_bits

_PACKED = "weight_packed"
_MAX_PATCHED = 1 / 64  # codes the layout cannot give back, as a share of the weight's, beyond which both are kept


class Int8ActLayout(NamedTuple):
    packed: Optional[torch.Tensor]  # the packed buffer it was built from; None once that is let go
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    versions: tuple  # of packed (as rebuilt), scale, zero point when it was built
    codes: torch.Tensor  # what linear_int8_act reads
    params: torch.Tensor
    patch: Optional[tuple]  # (flat positions int64, codes uint8) the layout gives back wrong, or None
    rebuilds_packed: bool  # int8_act_unlayout (and the patch) give the packed bytes back exactly


def _versions(*tensors) -> tuple:
    return tuple(-1 if t is None else -2 if t.is_inference() else t._version for t in tensors)


def _held_elsewhere(buffers: dict, name: str) -> bool:
    """Whether something besides ``buffers`` refers to the tensor ``buffers[name]`` or shares its storage."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return True  # cannot tell: keep it
    # references: the dict and getrefcount's argument; storage users: the tensor and the storage
    # object made here to ask
    return sys.getrefcount(buffers[name]) > 2 or use_count(buffers[name].untyped_storage()._cdata) > 2


class Int8ActWeight:
    """Mixin of QuantLinear (before PackedWeightModule in its bases): the CPU layout and the
    packed buffer it stands in for."""

    keep_packed_beside_layout = False
    _int8_act_weight: Optional[Int8ActLayout] = None
    _packed_in_layout = False  # weight_packed let go: the layout holds its codes

    def _init_int8_act_weight(self) -> None:
        self._int8_act_weight = None
        self._packed_in_layout = False

    def _int8_act_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, params) for linear_int8_act, rebuilt when a weight buffer changed (in place: its
        version; replaced, e.g. by a move: its identity; loaded into: load_state_dict drops it).
        Buffers made under torch.inference_mode have no version counter: for them only
        replacement and load_state_dict are seen."""
        ws, wz = self.weight_scale, self.weight_zero_point
        layout = self._int8_act_weight
        if self._packed_in_layout:
            if layout.scale is ws and layout.zero_point is wz and layout.versions[1:] == _versions(ws, wz):
                return layout.codes, layout.params
            self._restore_packed()  # scales changed: params are rebuilt from the packed weight
            layout = self._int8_act_weight
        wp = self.weight_packed
        versions = _versions(wp, ws, wz)
        if (layout is None or layout.packed is not wp or layout.scale is not ws or layout.zero_point is not wz
                or layout.versions != versions):
            codes, params = ops.int8_act_layout(wp, ws, wz, self.fmt, symmetric=self.symmetric,
                                                group_size=self.group_size, k=self.in_features)
            layout = self._int8_act_weight = Int8ActLayout(wp, ws, wz, versions, codes, params,
                                                           *self._how_to_rebuild(codes, wp))
        codes, params, exact = layout.codes, layout.params, layout.rebuilds_packed
        del wp, layout  # no references of ours to the packed tensor left but the buffer and the layout
        if exact and not self.keep_packed_beside_layout and not torch.compiler.is_compiling():
            self._let_go_of_packed()
        return codes, params

    def _how_to_rebuild(self, codes: torch.Tensor, wp: torch.Tensor) -> tuple:
        """(patch, exact) for Int8ActLayout."""
        if self.keep_packed_beside_layout or wp.device.type != "cpu":
            return None, False
        back = self._unlayout(codes, None)
        if torch.equal(back, wp):
            return None, True
        bits, k = format_bits(self.fmt), self.in_features
        want, got = ops.unpack(wp, bits, k).flatten(), ops.unpack(back, bits, k).flatten()
        where = (want != got).nonzero().squeeze(1)
        if where.numel() > _MAX_PATCHED * want.numel():
            return None, False
        patch = (where, want[where].clone())
        return patch, torch.equal(self._unlayout(codes, patch), wp)

    def _unlayout(self, codes: torch.Tensor, patch: Optional[tuple]) -> torch.Tensor:
        packed = ops.int8_act_unlayout(codes, self.fmt, n=self.out_features, k=self.in_features)
        if patch is None:
            return packed
        bits, k = format_bits(self.fmt), self.in_features
        unpacked = ops.unpack(packed, bits, k)
        unpacked.view(-1)[patch[0]] = patch[1]
        return ops.pack(unpacked, bits)

    def _let_go_of_packed(self) -> None:
        layout = self._int8_act_weight
        self._int8_act_weight = layout._replace(packed=None)
        del layout
        if self._buffers[_PACKED].device.type != "cpu" or _held_elsewhere(self._buffers, _PACKED):
            self._int8_act_weight = self._int8_act_weight._replace(packed=self._buffers[_PACKED])
            return
        del self._buffers[_PACKED]
        self._packed_in_layout = True

    def _restore_packed(self) -> None:
        """weight_packed back as a buffer, from the layout's codes (which stay valid for it)."""
        layout = self._int8_act_weight
        with torch.inference_mode(False):  # a normal tensor: load_state_dict may write into it later
            wp = self._unlayout(layout.codes, layout.patch)
        self._buffers[_PACKED] = wp
        self._packed_in_layout = False
        self._int8_act_weight = layout._replace(packed=wp, versions=(wp._version,) + layout.versions[1:])

    def __getattr__(self, name: str):
        if name == _PACKED and self._packed_in_layout:
            self._restore_packed()
            return self._buffers[_PACKED]
        return nn.Module.__getattr__(self, name)

    def __setattr__(self, name: str, value) -> None:
        if name == _PACKED and self._packed_in_layout:
            self._packed_in_layout = False  # replaced: the layout is rebuilt from the new tensor
            self._int8_act_weight = None
            self._buffers[_PACKED] = None
        nn.Module.__setattr__(self, name, value)

    def _apply(self, fn, recurse=True):
        if self._packed_in_layout:
            self._restore_packed()
        self._int8_act_weight = None  # moved or converted buffers: the layout is rebuilt from them
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        if self._packed_in_layout:
            self._restore_packed()
        self._int8_act_weight = None  # copied into in place (not seen by a version under inference_mode)
        return super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._packed_in_layout:  # a fresh packed tensor for the state_dict, not kept
            layout = self._int8_act_weight
            destination[prefix + _PACKED] = self._unlayout(layout.codes, layout.patch)
        super()._save_to_state_dict(destination, prefix, keep_vars)
