"""GPTQ: quantize a weight column by column, folding each column's rounding error into the
columns not yet quantized, so that the layer's output on calibration inputs stays close
(Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"; the column update is the Optimal Brain Surgeon step).

For a linear layer y = x W^T with inputs X, the error ||X W^T - X Q^T||^2 has the Hessian
H = 2 X^T X (one per layer, shared by all output rows). Quantizing column j to q_j and then
updating the later columns by -(w_j - q_j) / [H^-1]_jj * [H^-1]_j,>j minimizes that error over
the later columns exactly (tests check it against a direct least-squares solve). The inverse
is taken once, through its upper Cholesky factor, and the updates of a block of columns are
applied to the rest of the matrix in one matrix product ("lazy batch" updates).

Works for every format: a column is quantized by the format's own fake_quantize kernel with the
scale of its group, so the stored codes are exactly the ones the search chose. Group scales are
chosen by the weight quantizer's own rule (min/max, zero_opt or clip_search, rounded to its
scale dtype) on the error-updated weights when a group starts; with ``act_order`` the columns
are visited by decreasing Hessian diagonal and the scales of all groups are chosen up front
("static groups"), so the stored layout stays the plain grouped one.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import ops
from ..formats import FLOAT_INFO, format_bits, int_range
from ..layout import PER_CHANNEL, PER_TENSOR, group_length
from ..packed import PackedTensor, concat_rows
from ..quantizers.base import BaseQuantizer


@dataclass
class GPTQOptions:
    """damp: fraction of the mean Hessian diagonal added to it (numerical safety; GPTQ uses 0.01).
    block_size: columns whose updates are applied to the rest in one matrix product.
    act_order: visit columns by decreasing Hessian diagonal (static group scales).
    refit: afterwards refit each group's scale / zero point to the chosen codes (least squares
    on the group's block of the Hessian)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    refit: bool = False

    def __post_init__(self):
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not 0 <= self.damp < 1:
            raise ValueError(f"GPTQ damp must be a number in [0, 1); got {self.damp!r}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or not 1 <= self.block_size <= 4096:
            raise ValueError(f"GPTQ block_size must be an integer in [1, 4096]; got {self.block_size!r}")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"GPTQ act_order must be true or false; got {self.act_order!r}")


class HessianAccumulator:
    """Running H = 2/n * sum x x^T over the rows of every input seen (each batch's product in
    float32, the running sum in float64)."""

    def __init__(self, k: int, device=None):
        self.h = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        x = x.to(torch.float32) if x.dtype != torch.float64 else x
        self.h += (x.T @ x).to(torch.float64)
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration input reached this layer: cannot build its Hessian")
        return (2.0 / self.n) * self.h


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising the damping if H is singular."""
    k = h.shape[0]
    mean_diag = torch.diagonal(h).mean().item() or 1.0
    for extra in (0.0, 1e-6, 1e-4, 1e-2, 1e-1):
        lam = (damp + extra) * mean_diag
        hd = h + lam * torch.eye(k, dtype=h.dtype, device=h.device)
        chol, info = torch.linalg.cholesky_ex(hd)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                return upper
    raise ValueError("the calibration Hessian could not be inverted even with 10% damping")


def _quantize_column(w: torch.Tensor, quantizer: BaseQuantizer, scale: torch.Tensor, zero,
                     codebook: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantize-dequantize one column [rows] with its per-row scale (and zero point) [rows, 1].

    Integers use the kernels' formula (quant_math.h: rint(x / s + z), clamped, then (q - z) * s,
    in float32) directly, which is much cheaper than an op call per column; float formats go
    through the format's own fake_quantize kernel. Error feedback can push a weight past its
    group's range: float formats saturate there (e5m2 would round it to Inf), as integer codes
    do by clamping."""
    x = w.unsqueeze(1).to(torch.float32)
    if codebook is not None:  # a learned code book (lut4): the nearest of its values, scaled
        table = codebook.float()
        codes = quantizer.nearest(x, scale, table)
        values = table.gather(-1, codes) if table.dim() == 2 else table[codes]
        return (values * scale).squeeze(1)
    if quantizer.fmt.startswith("int"):
        qmin, qmax = int_range(format_bits(quantizer.fmt), quantizer.symmetric)
        z = zero if zero is not None else 0.0
        return ((x / scale + z).round_().clamp_(qmin, qmax) - z).mul_(scale).squeeze(1)
    if quantizer.fmt in FLOAT_INFO:
        limit = scale * FLOAT_INFO[quantizer.fmt].max_value
        x = torch.maximum(torch.minimum(x, limit), -limit)
    q = ops.fake_quantize(x, quantizer.fmt, symmetric=quantizer.symmetric,
                          group_size=1, scale=scale, zero_point=zero)
    return q.squeeze(1)


ROW_CHUNK = 2048  # rows are independent given H: chunks keep a block of columns in cache


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, quantizer: BaseQuantizer,
                  options: GPTQOptions = GPTQOptions()) -> PackedTensor:
    """Quantize ``weight`` [rows, k] with GPTQ for the input Hessian ``hessian`` [k, k].

    Returns the quantizer's PackedTensor (same layout, scales and dtypes as ``quantize_weight``)
    whose codes are the ones GPTQ chose.
    """
    if weight.dim() != 2:
        raise ValueError(f"GPTQ quantizes 2-D weights [out, in]; got shape {tuple(weight.shape)}")
    rows, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not fit a weight with {k} input columns")
    if not torch.isfinite(weight).all():
        raise ValueError("GPTQ needs a finite weight (it holds NaN or Inf)")
    h = hessian.detach().to(torch.float64).clone()
    if not torch.isfinite(h).all():
        raise ValueError("the calibration Hessian holds NaN or Inf (non-finite activations?)")
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0

    perm = torch.argsort(torch.diagonal(h), descending=True) if options.act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    u = _inverse_cholesky(h, options.damp)
    n = _rows_per_block(quantizer, k)
    if quantizer.config.op_group_size == PER_TENSOR or quantizer.fmt == "lut4" or rows <= n:
        return _gptq_block(weight, hessian, u, dead, perm, quantizer, options)
    # Rows are independent given H: blocks of rows bound the float32 copies (codes, refit, packing)
    # by the block, not the weight (an LM head of 32000 x 4096 is 0.5 GB per copy).
    return concat_rows([_gptq_block(weight[r:r + n], hessian, u, dead, perm, quantizer, options)
                        for r in range(0, rows, n)])


ROW_BLOCK_BYTES = 16 << 20  # float32 bytes of rows GPTQ quantizes together (its temporaries are ~8x that)


def _rows_per_block(quantizer: BaseQuantizer, k: int) -> int:
    """Rows per block: a whole number of zero_opt's row blocks ((1 << 17) // k rows, refined with
    an early stop each, when scales are chosen for the whole weight) and of the column loop's
    ROW_CHUNK (within which group scales are chosen as their columns come up), so that blocks give
    the codes of the whole weight."""
    base = math.lcm(ROW_CHUNK, max(1, (1 << 17) // max(1, k)))
    return base * max(1, ROW_BLOCK_BYTES // (4 * k) // base)


def _gptq_block(weight, hessian, u, dead, perm, quantizer, options) -> PackedTensor:
    """GPTQ on the rows ``weight`` [r, k] given the inverse Cholesky factor ``u`` of the (permuted,
    damped) Hessian."""
    rows, k = weight.shape
    gs = quantizer.config.op_group_size
    glen = group_length(k, gs) if gs > 0 else k
    # Scales: per tensor and per channel they are known up front; per group they are chosen when
    # the group's first column comes up (or all at once with act_order, from the original weight).
    codebook = None
    static = gs in (PER_TENSOR, PER_CHANNEL) or options.act_order or quantizer.fmt == "lut4"
    col_group = None
    if quantizer.fmt == "lut4":
        # The code book is fitted once, up front, weighted by how much each input column matters
        # (the Hessian's diagonal); then GPTQ picks codes from it column by column.
        importance = torch.diagonal(hessian).detach().to(torch.float32).clamp_min(0)
        scale, codebook = quantizer.fit(weight, importance.expand(rows, k))
        zero = None
        col_group = (torch.arange(k) // glen if gs > 0 else torch.zeros(k, dtype=torch.long)).tolist()
        if perm is not None:
            col_group = [col_group[j] for j in perm.tolist()]
        if gs == PER_TENSOR:
            scale = scale.expand(rows, -1).contiguous()
    elif static:
        scale, zero = quantizer.choose_weight_scales(weight.detach().to(torch.float32))
        scale = scale.expand(rows, -1).contiguous() if gs == PER_TENSOR else scale
        zero = None if zero is None else (zero.expand(rows, -1).contiguous() if gs == PER_TENSOR else zero)
        col_group = (torch.arange(k) // glen if gs > 0 else torch.zeros(k, dtype=torch.long)).tolist()
        if perm is not None:
            col_group = [col_group[j] for j in perm.tolist()]
    else:
        n_groups = (k + glen - 1) // glen
        scale = torch.empty(rows, n_groups, dtype=torch.float32, device=weight.device)
        zero = torch.empty_like(scale) if quantizer.config.asymmetric_int else None

    q = torch.empty(rows, k, dtype=torch.float32, device=weight.device)
    with _one_cpu_thread(weight.device):
        _all_rows(weight, u, quantizer, scale, zero, col_group, glen, options.block_size, dead, perm, q, codebook)
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    if gs == PER_TENSOR:
        scale = scale[:1, :1]
        zero = None if zero is None else zero[:1, :1]
    if codebook is not None:
        return quantizer.pack_values(q, scale.contiguous(), codebook)
    if options.refit and gs > 0:
        q, scale, zero = refit_group_scales(weight.detach().to(torch.float32), q, scale, zero, hessian, glen,
                                            quantizer)
    return quantizer.pack_with_scales(q, scale.contiguous(), None if zero is None else zero.contiguous())


def refit_group_scales(w, q, scale, zero, hessian, glen, quantizer):
    """With the codes GPTQ chose fixed, refit each group's scale (and zero point) to minimize the
    layer's output error (w - w_hat)^T H (w - w_hat), one group at a time with the others held
    (block coordinate descent): a 2x2 (or 1x1) least-squares problem per row and group. A refit
    is kept only where it lowers the error after rounding to the scale dtype and stays a valid
    scale, so the error never rises; the codes never change."""
    rows, k = w.shape
    h = hessian.detach().to(torch.float64)
    scale, zero = scale.clone(), None if zero is None else zero.clone()
    out = q.clone()
    resid = w.double() - q.double()  # w - w_hat, kept current as groups change
    for g, c0 in enumerate(range(0, k, glen)):
        c1 = min(c0 + glen, k)
        hg = h[c0:c1, c0:c1]
        wg, qg = w[:, c0:c1].double(), q[:, c0:c1].double()
        # the other groups' residuals pull on this group through H's off-diagonal blocks
        pull = resid @ h[:, c0:c1] - resid[:, c0:c1] @ hg
        s0 = scale[:, g].double()
        z0 = zero[:, g].double() if zero is not None else torch.zeros_like(s0)
        codes = qg / s0.unsqueeze(1)  # integer codes (asym: after + z) or code values (others)
        if zero is not None:
            codes = codes + z0.unsqueeze(1)
        if quantizer.fmt.startswith("int"):
            codes = codes.round()
        ones = torch.ones_like(codes)
        hc, h1, hw = codes @ hg, ones @ hg, wg @ hg + pull
        a11, b1 = (hc * codes).sum(1), (hw * codes).sum(1)
        if zero is not None:  # w_hat = s * c - m, m = s * z
            a12, a22, b2 = -(hc * ones).sum(1), (h1 * ones).sum(1), -(hw * ones).sum(1)
            det = a11 * a22 - a12 * a12
            ok = det.abs() > 1e-12 * (a11.abs() * a22.abs()).clamp_min(1e-300)
            s_new = torch.where(ok, (b1 * a22 - a12 * b2) / det, s0)
            m_new = torch.where(ok, (a11 * b2 - a12 * b1) / det, s0 * z0)
            z_new = m_new / torch.where(s_new != 0, s_new, torch.ones_like(s_new))
        else:  # w_hat = s * c
            s_new = torch.where(a11 > 0, b1 / a11.clamp_min(1e-300), s0)
            z_new = z0
        s_new, z_new = quantizer._round_scales(s_new.float().unsqueeze(1),
                                               None if zero is None else z_new.float().unsqueeze(1))
        s_new = s_new.squeeze(1).double()
        z_new = z_new.squeeze(1).double() if zero is not None else z0

        def err(s_, z_):
            d = wg - (codes - z_.unsqueeze(1) if zero is not None else codes) * s_.unsqueeze(1)
            return ((d @ hg) * d).sum(1) + 2 * (d * pull).sum(1)

        if zero is not None and quantizer.config.integer_zero_point:
            # integer zero points: the continuous optimum's two integer neighbours and the current
            # one, each with its best scale (1-D least squares), the best of the three kept
            z_cont = m_new / torch.where(s_new != 0, s_new, torch.ones_like(s_new))
            top = float(2 ** quantizer.bits - 1)
            best_s, best_z, best_e = s0, z0, err(s0, z0)
            for z_try in (z_cont.floor(), z_cont.ceil(), z0):
                z_try = torch.nan_to_num(z_try, nan=0.0).clamp(0, top)
                shifted = codes - z_try.unsqueeze(1)
                a = ((shifted @ hg) * shifted).sum(1)
                s_fit = torch.where(a > 0, (hw * shifted).sum(1) / a.clamp_min(1e-300), s0)
                s_fit = quantizer._round_scales(s_fit.float().unsqueeze(1), None)[0].squeeze(1).double()
                e = err(s_fit, z_try)
                take = (s_fit > 0) & torch.isfinite(s_fit) & (e < best_e)
                best_s, best_z, best_e = (torch.where(take, s_fit, best_s), torch.where(take, z_try, best_z),
                                          torch.where(take, e, best_e))
            s_new, z_new = best_s, best_z
        better = (s_new > 0) & torch.isfinite(s_new) & torch.isfinite(z_new) & (err(s_new, z_new) < err(s0, z0))
        scale[:, g] = torch.where(better, s_new, s0).float()
        if zero is not None:
            zero[:, g] = torch.where(better, z_new, z0).float()
        s_g = scale[:, g].double().unsqueeze(1)
        shifted = codes - zero[:, g].double().unsqueeze(1) if zero is not None else codes  # keeps -0 as -0
        out[:, c0:c1] = (shifted * s_g).float()
        resid[:, c0:c1] = wg - out[:, c0:c1].double()
    return out, scale, zero


@contextlib.contextmanager
def _one_cpu_thread(device):
    """The column loop is thousands of small ops: on the CPU, thread hand-offs cost more than
    they save (7x slower with 2 threads on a busy 2-core machine), so it runs on one thread."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _all_rows(weight, u, quantizer, scale, zero, col_group, glen, block, dead, perm, q, codebook=None):
    rows = weight.shape[0]
    for r0 in range(0, rows, ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, rows)
        # Double precision for the error feedback: the updates add up over up to k columns.
        w = weight[r0:r1].detach().to(torch.float64).clone()
        w[:, dead] = 0.0  # inputs that are always zero: their weights never matter
        if perm is not None:
            w = w[:, perm]
        cb = codebook[r0:r1] if codebook is not None and codebook.dim() == 2 else codebook
        q[r0:r1] = _gptq_rows(w, u, quantizer, scale[r0:r1], None if zero is None else zero[r0:r1],
                              col_group, glen, block, cb)


def _gptq_rows(w, u, quantizer, scale, zero, col_group, glen, block, codebook=None):
    """The column loop over a chunk of rows ``w`` [r, k] (float64, permuted); fills ``scale`` /
    ``zero`` of dynamic groups in place; returns the quantized values [r, k] float32."""
    rows, k = w.shape
    static = col_group is not None
    if not static and block % glen and glen < block:
        block = max(glen, block // glen * glen)  # blocks hold whole groups
    q = torch.empty(rows, k, dtype=torch.float32, device=w.device)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        # transposed: column i of the block is the contiguous row i of w_blk
        w_blk = w[:, b0:b1].T.contiguous()
        err_blk = torch.empty_like(w_blk)
        u_blk = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if static:
                g = col_group[col]
            else:
                g = col // glen
                if col % glen == 0:
                    # the group as it stands now: this block's updated columns, then the rest
                    cols = torch.cat([w_blk[i:].T, w[:, b1:]], dim=1)[:, :min(glen, k - col)]
                    s_g, z_g = quantizer.choose_weight_scales(cols.to(torch.float32), group_size=PER_CHANNEL)
                    scale[:, g:g + 1] = s_g
                    if zero is not None:
                        zero[:, g:g + 1] = z_g
            s_col = scale[:, g:g + 1].contiguous()
            z_col = None if zero is None else zero[:, g:g + 1].contiguous()
            wc = w_blk[i]
            qc = _quantize_column(wc, quantizer, s_col, z_col, codebook)
            q[:, col] = qc
            e = (wc - qc.to(torch.float64)) / u_blk[i, i]
            w_blk[i:] -= u_blk[i, i:].unsqueeze(1) * e.unsqueeze(0)
            err_blk[i] = e
        w[:, b1:] -= err_blk.T @ u[b0:b1, b1:]
    return q


def layer_output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """trace((W - Q) H (W - Q)^T) / 2: the summed squared output error on the calibration inputs,
    per input row (H = 2/n X^T X)."""
    d = (weight.detach().to(torch.float64) - dequantized.detach().to(torch.float64))
    return 0.5 * float(((d @ hessian.to(torch.float64)) * d).sum())
