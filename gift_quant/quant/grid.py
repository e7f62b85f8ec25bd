"""The uniform b-bit grid: fit scale/zero per (row, group), quantize, dequantize. Pure torch.

Conventions are GPTQ's (docs/FORMAT.md#what-the-tensors-mean): codes q in [0, 2**b - 1],
``w ~ scale * (q - zero)``; symmetric grids fix ``zero = 2**(b-1)``. Scales are rounded to fp16
as soon as they are fitted, so every later step (GPTQ's error feedback, the saliency D-term, the
export) sees exactly the values that will be stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Grid", "dequantize", "fit_params", "quantize", "rtn_roundtrip"]


@dataclass(frozen=True)
class Grid:
    """Shape of the grid and how its clipping range is searched.

    Args:
        bits: code width.
        sym: zero fixed at 2**(bits-1).
        mse_clip: search a shrink factor p of [min, max] minimising sum |w - q(w)|**clip_norm.
        clip_grid, clip_max_shrink, clip_norm: candidates p = 1 - i/clip_grid for
            i < clip_max_shrink * clip_grid.
    """

    bits: int
    sym: bool = True
    mse_clip: bool = True
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.4

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @classmethod
    def from_config(cls, cfg) -> Grid:  # cfg: recipe.QuantConfig (duck-typed, no import cycle)
        return cls(
            bits=cfg.bits,
            sym=cfg.sym,
            mse_clip=cfg.mse_clip,
            clip_grid=cfg.clip_grid,
            clip_max_shrink=cfg.clip_max_shrink,
            clip_norm=cfg.clip_norm,
        )


def quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, maxq)`` as float (broadcasting)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return scale * (q - zero)


def _params_from_range(xmin: Tensor, xmax: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
    """Scale (fp16-exact) and zero for ranges [xmin, xmax] that contain 0."""
    maxq = grid.maxq
    if grid.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmax - xmin) == 0
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    # fp16 storage: round now, and never let a scale underflow to zero.
    scale = scale.to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny).to(torch.float32)
    if grid.sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def fit_params(w: Tensor, grid: Grid, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fit one (scale, zero) per row and group.

    Args:
        w: [rows, groups, size] float32 weights, one group per slice of the last dim.
        grid: grid shape and clip search.
        mask: [groups, size] bool, True where a column takes part in the fit (non-salient).
            Masked-out columns neither widen the range nor count in the clip error.
    Returns:
        scale, zero: [rows, groups] float32; scale is fp16-exact, zero integer-valued.
    """
    if mask is not None:
        m = mask.unsqueeze(0)
        big = torch.finfo(w.dtype).max
        xmin = torch.where(m, w, big).amin(-1).clamp(max=0)
        xmax = torch.where(m, w, -big).amax(-1).clamp(min=0)
    else:
        xmin = w.amin(-1).clamp(max=0)
        xmax = w.amax(-1).clamp(min=0)
    scale, zero = _params_from_range(xmin, xmax, grid)
    if not grid.mse_clip:
        return scale, zero

    weight = None if mask is None else mask.unsqueeze(0).to(w.dtype)
    n_cand = int(grid.clip_max_shrink * grid.clip_grid)
    if n_cand <= 1:
        return scale, zero
    # Two-level search over shrink steps i (p = 1 - i / clip_grid): every `step`-th candidate,
    # then the neighbours of the best one. 3-4x cheaper than all candidates; the chosen step
    # matches the exhaustive search wherever the error is unimodal in p on that grid.
    step = max(1, round(n_cand**0.5 / 2))
    coarse = torch.arange(0, n_cand, step, device=w.device).view(-1, 1, 1).expand(-1, *scale.shape)
    err, best_i = _clip_candidates(w, xmin, xmax, coarse, grid, weight)
    offsets = torch.tensor([o for o in range(-step + 1, step) if o], device=w.device).view(-1, 1, 1)
    if offsets.numel():
        fine = (best_i.unsqueeze(0) + offsets).clamp(0, n_cand - 1)
        err2, best2 = _clip_candidates(w, xmin, xmax, fine, grid, weight)
        best_i = torch.where(err2 < err, best2, best_i)
    p = 1 - best_i.to(w.dtype) / grid.clip_grid
    return _params_from_range(p * xmin, p * xmax, grid)


def _clip_candidates(
    w: Tensor, xmin: Tensor, xmax: Tensor, steps: Tensor, grid: Grid, weight: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Best of the candidate shrink steps ``steps`` [C, rows, groups]: (error, step) per slot."""
    best_err = torch.full(xmin.shape, float("inf"), dtype=w.dtype, device=w.device)
    best_i = torch.zeros(xmin.shape, dtype=torch.long, device=w.device)
    chunk = max(1, (1 << 24) // max(1, w.numel()))
    for start in range(0, steps.shape[0], chunk):
        i = steps[start : start + chunk]
        p = 1 - i.to(w.dtype) / grid.clip_grid
        s, z = _params_from_range(p * xmin, p * xmax, grid)  # [C, rows, groups]
        s, z = s.unsqueeze(-1), z.unsqueeze(-1)
        # |dequantize(quantize(w)) - w| ** norm, the same operations in place on one buffer
        # (a fresh [C, rows, groups, size] tensor per step made this search memory-bound)
        e = torch.div(w, s).round_().add_(z).clamp_(0, grid.maxq).sub_(z).mul_(s)
        e = e.sub_(w).abs_().pow_(grid.clip_norm)
        if weight is not None:
            e = e.mul_(weight)
        e, j = e.sum(-1).min(0)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_i = torch.where(better, i.gather(0, j.unsqueeze(0)).squeeze(0), best_i)
    return best_err, best_i


def rtn_roundtrip(weight: Tensor, grid: Grid, group_size: int) -> Tensor:
    """Q(W) with round-to-nearest on the given grid, all columns included: [rows, cols] float32.

    Used for the saliency D-term ``W - Q(W)``.
    """
    rows, cols = weight.shape
    g = cols if group_size == -1 else group_size
    w = weight.float().reshape(rows, cols // g, g)
    scale, zero = fit_params(w, grid)
    q = quantize(w, scale.unsqueeze(-1), zero.unsqueeze(-1), grid.maxq)
    return dequantize(q, scale.unsqueeze(-1), zero.unsqueeze(-1)).reshape(rows, cols)
