"""Column saliency: ``s_j = ||D_j||_tau * ||X_j||_rho ** gamma`` (the named presets the
recipe's ``saliency.metric`` chooses from are ``gift_quant.config.SALIENCY_PRESETS``) and the
per-matrix budget.

D = W - Q(W) is the round-to-nearest error on the same (MSE-clipped) grid that quantizes the
layer (docs/METHOD.md#2-saliency: with plain absmax |D| is nearly flat and the metric degenerates to
the activation term). Pure torch.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from gift_quant.calibration import LayerStats
from gift_quant.quant.grid import Grid, rtn_roundtrip

__all__ = ["column_scores", "salient_budget", "select_salient"]


def _col_norm(D: Tensor, p: float) -> Tensor:
    if math.isinf(p):
        return D.abs().amax(0)
    return torch.linalg.vector_norm(D, ord=p, dim=0)


@torch.no_grad()
def column_scores(
    weight: Tensor,
    stats: LayerStats,
    norms: tuple[float | None, float, float],
    grid: Grid,
    group_size: int,
) -> Tensor:
    """[K] saliency of each input column; ``norms`` = (tau or None, rho, gamma)."""
    tau, rho, gamma = norms
    x_term = stats.act_norm(rho).to(weight.device) ** gamma
    if tau is None:
        return x_term
    W = weight.float()
    D = W - rtn_roundtrip(W, grid, group_size)
    return _col_norm(D, tau) * x_term


def select_salient(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores, sorted ascending: [k] int64."""
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    return torch.sort(torch.topk(scores, k).indices).values


def salient_budget(name: str, in_features: int, out_features: int, saliency, quant) -> int:
    """Salient columns for one matrix from a SaliencyConfig and QuantConfig.

    Raises ValueError when the budget does not fit the layer.
    """
    ratio = 1.0
    for pattern, r in saliency.layer_ratios.items():
        if re.search(pattern, name):
            ratio = r
            break
    K, N = in_features, out_features
    if saliency.fraction is not None:
        k = round(saliency.fraction * K * ratio)
    elif saliency.avg_bits is not None:
        G = 1 if quant.group_size == -1 else K // quant.group_size
        base = K * N * quant.bits + G * N * (16 + quant.bits)
        room = saliency.avg_bits * K * N - base
        if room < 0:
            raise ValueError(
                f"{name}: saliency.avg_bits={saliency.avg_bits} is below the {base / (K * N):.3f} "
                f"bits/weight the grid alone stores; raise avg_bits or use fewer quant.bits"
            )
        k = math.floor(room * ratio / (16 * N + 32))
    else:
        count = saliency.DEFAULT_COUNT if saliency.count is None else saliency.count
        k = round(count * ratio)
    if k >= K:
        raise ValueError(
            f"{name}: salient budget of {k} columns does not fit a layer {K} columns wide; "
            f"lower saliency.count / saliency.fraction (e.g. saliency.fraction=0.03)"
        )
    return k
