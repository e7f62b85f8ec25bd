"""GIFT-SW noise: the per-row step of a b-bit grid, and seeded noise samples. Pure torch.

METHOD.md §1.4 / §5.4: the noise added to the frozen non-salient weights of row i is
N(0, (delta_i / 2)^2) ("normal") or U(-delta_i/2, delta_i/2) ("uniform"), where
``delta_i = alpha_i / (2**(b-1) - 1)`` is the step of a symmetric b-bit grid with codes in
[-2**(b-1), 2**(b-1) - 1] and clip range alpha_i found by a linear grid search minimising
||w - Q(w)||_2^2 over the row's non-salient weights (p = 1.00, 0.99, ..., 0.21 of max|w|).
delta is computed once, before training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gift_quant.registry import Registry

__all__ = ["NOISES", "noise_step", "sample_noise"]

# (shape, generator, device, dtype) -> unit-step noise; sample_noise scales row i by delta_i.
Noise = Callable[[tuple[int, int], torch.Generator, torch.device, torch.dtype], Tensor]
NOISES: Registry[Noise] = Registry("noise")


@NOISES.register("normal")
def normal(shape, gen, device, dtype) -> Tensor:
    """N(0, 1/4): standard deviation half a grid step."""
    return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(0.5)


@NOISES.register("uniform")
def uniform(shape, gen, device, dtype) -> Tensor:
    """U(-1/2, 1/2): the rounding error of a uniform grid with step 1."""
    return torch.rand(shape, generator=gen, device=device, dtype=dtype).sub_(0.5)


@torch.no_grad()
def noise_step(
    weight: Tensor, salient_idx: Tensor, bits: int, grid: int = 100, max_shrink: float = 0.8
) -> Tensor:
    """[N] step delta_i of the MSE-clipped symmetric ``bits`` grid of each row's non-salient
    part."""
    W = weight.float().clone()
    if salient_idx.numel():
        W[:, salient_idx.long()] = 0.0  # zeros neither widen the range nor add clip error
    qmax = 2 ** (bits - 1) - 1
    amax = W.abs().amax(1).clamp(min=1e-12)
    best_err = torch.full_like(amax, float("inf"))
    best = amax / qmax
    for i in range(int(max_shrink * grid)):
        delta = (1 - i / grid) * amax / qmax
        q = torch.clamp(torch.round(W / delta[:, None]), -qmax - 1, qmax)
        err = (q * delta[:, None] - W).square().sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, delta, best)
    return best


def sample_noise(
    shape: tuple[int, int],
    scale: Tensor,
    kind: str,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Noise [N, K] of the ``kind`` registered in NOISES, row i scaled by ``scale[i]``
    (= delta_i). Deterministic in ``seed``, so the backward pass can regenerate exactly what the
    forward pass used."""
    sample = NOISES.get(kind)
    gen = torch.Generator(device=device).manual_seed(seed)
    return sample(shape, gen, device, dtype).mul_(scale.to(dtype)[:, None])
