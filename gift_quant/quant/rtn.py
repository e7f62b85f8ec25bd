"""Round-to-nearest over the non-salient columns (docs/METHOD.md#4-quantizers)."""

from __future__ import annotations

import torch
from torch import Tensor

from gift_quant.quant.base import QuantizedWeight, check_shape, group_index
from gift_quant.quant.grid import Grid, fit_params, quantize


@torch.no_grad()
def rtn(weight: Tensor, hessian: Tensor | None, salient_idx: Tensor, cfg) -> QuantizedWeight:
    """Quantize ``weight`` [N, K] per (row, group) with the scale/zero fitted on the non-salient
    columns only; salient columns keep their original values and get zero-point codes.

    ``hessian`` is ignored (RTN needs no calibration beyond the saliency ranking).
    """
    N, K = weight.shape
    check_shape(K, N, cfg.group_size)
    grid = Grid.from_config(cfg)
    g = K if cfg.group_size == -1 else cfg.group_size
    W = weight.float().reshape(N, K // g, g)
    keep = torch.ones(K, dtype=torch.bool, device=weight.device)
    keep[salient_idx] = False
    mask = keep.reshape(K // g, g)
    scale, zero = fit_params(W, grid, mask)
    codes = quantize(W, scale.unsqueeze(-1), zero.unsqueeze(-1), grid.maxq)
    codes = torch.where(mask, codes, zero.unsqueeze(-1)).reshape(N, K)
    return QuantizedWeight(
        codes=codes.to(torch.int32),
        scales=scale,
        zeros=zero,
        g_idx=group_index(K, cfg.group_size).to(weight.device),
        salient_idx=salient_idx.clone(),
        salient_weight=weight.float()[:, salient_idx].clone(),
        bits=cfg.bits,
        group_size=cfg.group_size,
        sym=cfg.sym,
    )
