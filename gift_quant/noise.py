"""GIFT-SW noise: the per-row step of a b-bit grid, and seeded noise samples. Pure torch.

docs/METHOD.md#5-gift-sw-training: the noise added to the frozen non-salient weights of row i is
N(0, (delta_i / 2)^2) ("normal") or U(-delta_i/2, delta_i/2) ("uniform"), where
``delta_i = alpha_i / (2**(b-1) - 1)`` is the step of a symmetric b-bit grid with codes in
[-2**(b-1), 2**(b-1) - 1] and clip range alpha_i found by a linear grid search minimising
||w - Q(w)||_2^2 over the row's non-salient weights (p = 1.00, 0.99, ..., 0.21 of max|w|).
delta is computed once, before training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gift_quant.registry import NOISES

__all__ = ["NOISES", "noise_step", "sample_noise"]

# The noise kinds NOISES names (gift_quant.registry): (shape, generator, device, dtype) ->
# unit-step noise; sample_noise scales it by delta.


def normal(shape, gen, device, dtype) -> Tensor:
    """N(0, 1/4): standard deviation half a grid step."""
    return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(0.5)


def uniform(shape, gen, device, dtype) -> Tensor:
    """U(-1/2, 1/2): the rounding error of a uniform grid with step 1."""
    return torch.rand(shape, generator=gen, device=device, dtype=dtype).sub_(0.5)


@torch.no_grad()
def noise_step(
    weight: Tensor,
    salient_idx: Tensor,
    bits: int,
    grid: int = 100,
    max_shrink: float = 0.8,
    budget: int | None = None,
) -> Tensor:
    """[N] step delta_i of the MSE-clipped symmetric ``bits`` grid of each row's non-salient
    part.

    Runs where ``weight`` lives and evaluates many clip candidates per call: candidates are
    stacked into [C, rows, K] chunks of at most ``budget`` elements (rows in slices when one
    row block alone exceeds it), computed in place. The default budget is large on a GPU
    (few launches) and cache-sized on the CPU (4 MB chunks stay in cache: on SmolLM2's
    1536 x 576 layers about 20x faster than 256 MB chunks, the same result bit for bit). Ties
    keep the widest range (the first candidate), as a sequential search would.
    """
    if budget is None:
        budget = 1 << 26 if weight.is_cuda else 1 << 20
    W = weight.float().clone()
    if salient_idx.numel():
        W[:, salient_idx.long()] = 0.0  # zeros neither widen the range nor add clip error
    qmax = 2 ** (bits - 1) - 1
    amax = W.abs().amax(1).clamp(min=1e-12)
    shrink = 1 - torch.arange(int(max_shrink * grid), device=W.device, dtype=W.dtype) / grid
    best = torch.empty_like(amax)
    rows = max(1, min(W.shape[0], budget // max(1, W.shape[1])))
    for r0 in range(0, W.shape[0], rows):
        w, a = W[r0 : r0 + rows], amax[r0 : r0 + rows]
        per_chunk = max(1, budget // max(1, w.numel()))
        best_err = torch.full_like(a, float("inf"))
        best_delta = a / qmax
        for c0 in range(0, shrink.numel(), per_chunk):
            delta = shrink[c0 : c0 + per_chunk, None] * a / qmax  # [C, rows]
            d = delta[:, :, None]
            q = torch.div(w, d).round_().clamp_(-qmax - 1, qmax)
            err = q.mul_(d).sub_(w).square_().sum(-1)  # [C, rows]
            e, j = err.min(0)  # first minimum within the chunk
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best_delta = torch.where(better, delta.gather(0, j[None]).squeeze(0), best_delta)
        best[r0 : r0 + rows] = best_delta
    return best


def sample_noise(
    shape: tuple[int, int],
    scale: Tensor,
    kind: str,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Noise of ``shape`` of the ``kind`` registered in NOISES, times ``scale`` (broadcast:
    ``delta[:, None]`` scales the rows of an [N, K] weight, ``delta[None, :]`` the columns of
    its transpose). Deterministic in ``seed``, so the backward pass can regenerate exactly
    what the forward pass used."""
    sample = NOISES.get(kind)
    gen = torch.Generator(device=device).manual_seed(seed)
    return sample(shape, gen, device, dtype).mul_(scale.to(dtype))
