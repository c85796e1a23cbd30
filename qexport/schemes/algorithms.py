"""How the codes of a weight grid are chosen: round to nearest (rtn), half-quadratic optimisation
(hqq, calibration-free, uint4 groups), the scale of least squared error (mse, calibration-free,
symmetric int8 rows) and GPTQ (from calibration inputs, both grids).

Every int4 algorithm yields the same grid int4.py dequantizes: codes 0..15, per group a bf16 scale and an
integer zero point in [0, 15] (8 for symmetric weights), w ≈ (code - zero) * scale. A region's
algorithm therefore changes its tensors, never its math, and every backend lowers it unchanged.

torchao ships both algorithms but neither fits this grid: its HQQ (`quant_primitives.
_choose_qparams_and_quantize_affine_hqq`) optimises a float zero point (tinygemm's domain), which
ONNX's uint4 DequantizeLinear and XNNPACK cannot store (rounding it afterwards loses the gain), and its
GPTQ (`prototype.gptq`) is CUDA-only with mslk's float-zero int4 rows. Both loops are short; they are
written here against the grid. The int8 grid (int8.py) is one float scale per output channel (or
per tensor) and codes qmin..qmax around zero; mse and gptq only choose that scale and those codes.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import CalibrationError

QMAX = 15
SYMMETRIC_ZERO = 8
_EPS = torch.finfo(torch.float32).eps

#: (groups (..., G, group_size)) -> (scale, zero) each (..., G): how a group's grid is chosen
QParams = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """Scales are stored in bf16: codes are chosen against the stored value, so dequantization is exact."""
    return t.to(torch.bfloat16).float()


def grid_codes(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes (float, 0..15) of groups g (..., G, group_size) on the grid (scale, zero) (..., G)."""
    return torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, QMAX)


def rtn_qparams(g: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max of each group (widened to include 0, which stays exact) mapped onto 0..15."""
    if symmetric:
        scale = _bf16((g.abs().amax(-1) / (SYMMETRIC_ZERO - 1)).clamp(min=_EPS))
        return scale, torch.full_like(scale, SYMMETRIC_ZERO)
    mn, mx = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = _bf16(((mx - mn) / QMAX).clamp(min=_EPS))
    return scale, torch.clamp(torch.round(-mn / scale), 0, QMAX)


# -- hqq ---------------------------------------------------------------------------------------------

#: HQQ's defaults (Badri & Shaji 2023; the hqq package and torchao): an l_0.7 error norm, whose
#: shrinkage lets a few outliers keep large errors so the rest of the group fits better.
HQQ_LP_NORM, HQQ_BETA, HQQ_KAPPA, HQQ_ITERS = 0.7, 10.0, 1.01, 20
_HQQ_ROWS = 4096  # groups per chunk: keeps the temporaries of a 30k-row embedding table small


def _shrink_lp(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Proximal operator of the l_p norm (p < 1), the half-quadratic split's error step."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().pow(HQQ_LP_NORM - 1) / beta)


def hqq_qparams(g: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-quadratic optimisation of each group's scale and integer zero point, from rtn's grid.

    Alternates (HQQ): the sparse error W_e = shrink_lp(W - dequant(W)); then the grid that best
    reproduces W - W_e given the codes, solved in closed form by least squares (scale and offset, the
    zero point rounded to the grid's integers, the scale refitted to it; symmetric groups keep zero 8
    and refit the scale only). The grid with the lowest squared weight error seen is kept, per group,
    so the result is never worse than rtn on that measure.
    """
    flat = g.reshape(-1, g.shape[-1])
    parts = [_hqq_chunk(flat[i : i + _HQQ_ROWS], symmetric) for i in range(0, flat.shape[0], _HQQ_ROWS)]
    scale = torch.cat([p[0] for p in parts]).reshape(g.shape[:-1])
    zero = torch.cat([p[1] for p in parts]).reshape(g.shape[:-1])
    return scale, zero


def _hqq_chunk(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zero = rtn_qparams(w, symmetric)
    best_err = torch.full_like(scale, float("inf"))
    best_scale, best_zero = scale, zero
    beta = HQQ_BETA
    for step in range(HQQ_ITERS + 1):
        q = grid_codes(w, scale, zero)
        d = q - zero[:, None]
        residual = w - d * scale[:, None]
        err = residual.pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        if step == HQQ_ITERS:
            break
        target = w - _shrink_lp(residual, beta)
        if not symmetric:
            qm, tm = q.mean(-1, keepdim=True), target.mean(-1, keepdim=True)
            var = (q - qm).pow(2).sum(-1)
            slope = ((q - qm) * (target - tm)).sum(-1) / var.clamp(min=_EPS)
            slope = torch.where(var > 0, slope, scale).clamp(min=_EPS)
            zero = torch.clamp(torch.round((qm[:, 0] * slope - tm[:, 0]) / slope), 0, QMAX)
            d = q - zero[:, None]
        fitted = (target * d).sum(-1) / d.pow(2).sum(-1).clamp(min=_EPS)
        scale = torch.where(fitted > 0, _bf16(fitted.clamp(min=_EPS)), scale)
        beta *= HQQ_KAPPA
    return best_scale, best_zero


# -- mse ---------------------------------------------------------------------------------------------

#: fractions of a row's absmax tried as its clipping threshold (1.0 is rtn's scale, so mse never does
#: worse than rtn on its measure); heavy-tailed rows clip best far below their absmax
MSE_SHRINKS = tuple(1.0 - 0.02 * i for i in range(26))
MSE_ITERS = 8
_MSE_ROWS = 4096  # rows per chunk, as _HQQ_ROWS


def symmetric_codes(rows: torch.Tensor, scale: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    return torch.clamp(torch.round(rows / scale[:, None]), qmin, qmax)


def mse_scale(rows: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """The scale of each row (R, K) on the symmetric grid code * scale, codes qmin..qmax, with the least
    squared reconstruction error: the best of MSE_SHRINKS x absmax / qmax, then alternating the codes
    (rounding) and the scale (least squares given the codes), each step keeping the error from rising.
    Per-tensor scales pass the tensor as one row."""
    parts = [_mse_chunk(rows[i : i + _MSE_ROWS], qmin, qmax) for i in range(0, rows.shape[0], _MSE_ROWS)]
    return torch.cat(parts)


def _mse_chunk(rows: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    amax = rows.abs().amax(-1)
    best_scale, best_err = None, None
    for scale in [(amax * f / qmax).clamp(min=_EPS) for f in MSE_SHRINKS] + [None] * MSE_ITERS:
        if scale is None:  # refinement: the least-squares scale for the best codes so far
            q = symmetric_codes(rows, best_scale, qmin, qmax)
            fitted = (rows * q).sum(-1) / q.pow(2).sum(-1).clamp(min=_EPS)
            scale = torch.where(fitted > 0, fitted, best_scale).clamp(min=_EPS)
        err = (rows - symmetric_codes(rows, scale, qmin, qmax) * scale[:, None]).pow(2).sum(-1)
        if best_scale is None:
            best_scale, best_err = scale, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


# -- gptq --------------------------------------------------------------------------------------------

#: dampening added to the Hessian's diagonal, relative to its mean. GPTQ's paper uses 0.01 with 128
#: sequences of 2048 tokens; with the few hundred tokens a small calibration set has, the Hessian of a
#: wide layer is far from full rank and 0.1 generalises better (all-MiniLM-L6-v2, 12 sentences:
#: sentence cosine 0.975 vs 0.970 at group 128).
GPTQ_DAMP = 0.1
GPTQ_BLOCK = 128


def gptq(
    w: torch.Tensor, hessian: torch.Tensor, group_size: int, qparams: QParams, qmin: float = 0, qmax: float = QMAX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022) of a 2-D weight (out, K) on a group grid with codes qmin..qmax:
    (codes (out, K), scale, zero (out, K/group_size)); a per-channel grid is one group of K.

    Minimises ||X W^T - X Q^T||^2 over the calibration inputs X (hessian = sum of X^T X): columns are
    quantized one at a time and each one's error is spread over the columns not yet quantized, through
    the inverse Hessian. Columns go in order of decreasing Hessian diagonal (act-order: the inputs with
    the most energy first, while the most columns are left to absorb their error); the grid of each
    group is chosen up front by `qparams` on the original weights (static groups), so the groups stay
    contiguous runs of K as the region format stores them.
    """
    w = w.detach().float().clone()
    h = hessian.detach().float().clone()
    k = w.shape[1]
    scale, zero = qparams(w.reshape(w.shape[0], -1, group_size))
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h)
    group = perm // group_size
    col_scale, col_zero = scale[:, group], zero[:, group]  # (out, K) in the permuted order
    codes = torch.empty_like(w)
    for b0 in range(0, k, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, k)
        block, err = w[:, b0:b1].clone(), torch.empty_like(w[:, b0:b1])
        hb = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            s, z = col_scale[:, b0 + j], col_zero[:, b0 + j]
            col = block[:, j]
            q = torch.clamp(torch.round(col / s) + z, qmin, qmax)
            codes[:, b0 + j] = q
            e = (col - (q - z) * s) / hb[j, j]
            block[:, j:] -= e[:, None] * hb[j, j:][None, :]
            err[:, j] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return codes[:, torch.argsort(perm)], scale, zero


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of the dampened Hessian's inverse (what GPTQ's column updates read)."""
    diag = torch.arange(h.shape[0])
    damp = GPTQ_DAMP * torch.mean(torch.diag(h))
    for _ in range(4):  # a rank-deficient Hessian may need more dampening to be positive definite
        hd = h.clone()
        hd[diag, diag] += damp
        chol, info = torch.linalg.cholesky_ex(hd.double())
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float()
        damp *= 10
    raise CalibrationError(
        "GPTQ: the calibration inputs' Hessian is not positive definite even when dampened; calibrate on "
        "more (or more varied) inputs, or use a calibration-free algorithm ('hqq' for int4, 'mse' for int8)")
