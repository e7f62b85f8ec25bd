"""Block-by-block calibration: capture block inputs, collect per-Linear statistics
(:class:`LayerStats`: the Hessian and activation norms that GPTQ and the saliency metric read),
run blocks.

Only one block's activations (the inputs of every calibration batch) and one block's
statistics live beyond the model weights; blocks can stay on the CPU and visit the GPU one
at a time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gift_quant.errors import RecipeError

__all__ = [
    "LayerStats",
    "capture_block_inputs",
    "collect_stats",
    "forward_block",
    "plan_groups",
    "to_device",
]


@dataclass
class LayerStats:
    """Statistics of one Linear's input over the calibration tokens (all fp32).

    Fields (a statistic nobody asked for stays None):
        act_max: [K] max_t |x_tj|.
        act_abs_sum: [K] sum_t |x_tj|.
        act_sq_sum: [K] sum_t x_tj^2.
        hessian: [K, K] mean_t x_t x_t^T.
        num_tokens: tokens seen.
    """

    act_max: Tensor | None
    act_abs_sum: Tensor | None
    act_sq_sum: Tensor | None
    hessian: Tensor | None
    num_tokens: int = 0

    @classmethod
    def empty(
        cls, in_features: int, with_hessian: bool, norms=(1.0, 2.0, math.inf), device=None
    ) -> LayerStats:
        """Accumulators for the Hessian (GPTQ) and the activation norms in ``norms``."""

        def z(p):
            return torch.zeros(in_features, device=device) if p in norms else None

        h = torch.zeros(in_features, in_features, device=device) if with_hessian else None
        return cls(z(math.inf), z(1.0), z(2.0), h, 0)

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Accumulate a batch of inputs ``x`` [..., K]."""
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if self.act_max is not None or self.act_abs_sum is not None:
            a = x.abs()
            if self.act_max is not None:
                torch.maximum(self.act_max, a.amax(0), out=self.act_max)
            if self.act_abs_sum is not None:
                self.act_abs_sum += a.sum(0)
        if self.act_sq_sum is not None:
            self.act_sq_sum += x.square().sum(0)
        if self.hessian is not None:
            # running mean keeps magnitudes bounded on long calibration sets
            self.hessian.mul_(self.num_tokens / (self.num_tokens + n))
            self.hessian.addmm_(x.t(), x, alpha=1.0 / (self.num_tokens + n))
        self.num_tokens += n

    def act_norm(self, p: float) -> Tensor:
        """[K] ``||X_j||_p`` over tokens for p in {1, 2, inf}."""
        if p not in (1.0, 2.0, math.inf):
            raise ValueError(f"norm must be 1, 2 or inf, got {p}")
        t = {math.inf: self.act_max, 1.0: self.act_abs_sum, 2.0: self.act_sq_sum}[p]
        if t is None:
            raise ValueError(f"the ||X||_{p} statistic was not collected")
        return t.sqrt() if p == 2 else t


class _StopForward(Exception):
    """Ends a forward pass once what we need has been recorded."""


def to_device(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move tensors inside nested tuples/lists/dicts; floating tensors also to ``dtype``."""
    if isinstance(obj, Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


class _Recorder(nn.Module):
    """Stands in for a decoder block: records what the block would receive, passes x through."""

    def __init__(self, index: int, last: int, store: dict) -> None:
        super().__init__()
        self.index, self.last, self.store = index, last, store

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.store["hidden"] = hidden_states
        self.store.setdefault("kwargs", []).append(kwargs)
        if args:
            raise TypeError("decoder blocks called with extra positional args are not supported")
        if self.index == self.last:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: Iterable[Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[list[Tensor], list[list[dict]]]:
    """Run the model up to its blocks for every batch of token ids.

    Returns ``(inputs, kwargs)``: ``inputs[b]`` is the hidden state entering block 0 for batch b
    (on ``device`` in ``dtype``), ``kwargs[b][i]`` what block i receives besides it (masks,
    position embeddings: they differ per block in models with sliding-window layers).
    Blocks are replaced by recorders, so only embeddings and position code run.
    """
    originals = list(blocks)
    store: dict = {}
    last = len(originals) - 1
    for i in range(len(originals)):
        blocks[i] = _Recorder(i, last, store)
    inputs, kwargs = [], []
    model_device = next(model.parameters()).device
    try:
        model.to(device)
        for ids in batches:
            store.clear()
            with contextlib.suppress(_StopForward):
                model(input_ids=ids.to(device), use_cache=False)
            inputs.append(store["hidden"].to(dtype))
            kwargs.append([to_device(kw, device, dtype) for kw in store["kwargs"]])
    finally:
        model.to(model_device)
        for i, block in enumerate(originals):
            blocks[i] = block
    return inputs, kwargs


@torch.no_grad()
def plan_groups(
    block: nn.Module, targets: dict[str, nn.Module], x: Tensor, kwargs: dict
) -> list[list[str]]:
    """Target names grouped for true-sequential quantization, in execution order.

    Consecutive Linears that read the same input tensor (q/k/v, gate/up) form one group.
    """
    order: list[tuple[str, int]] = []
    alive: list[Tensor] = []  # keep inputs alive so their id() stays unique during the pass

    def hook(name):
        def record(_module, args):
            alive.append(args[0])
            order.append((name, id(args[0])))

        return record

    local = {m: n for n, m in targets.items()}
    handles = [m.register_forward_pre_hook(hook(local[m])) for m in targets.values()]
    try:
        block(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen, last_input = set(), None
    for name, key in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and key == last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = key
    missing = [n for n in targets if n not in seen]
    if missing:
        groups.append(missing)  # never called on calibration data; quantize them last
    return groups


@torch.no_grad()
def _check_finite(x: Tensor, name: str) -> None:
    """Statistics of NaN/inf activations would make GPTQ fail obscurely or quantize to garbage."""
    if not bool(torch.isfinite(x).all()):
        raise RecipeError(
            f"calibration activations entering {name} hold NaN or inf (an overflow in the "
            f"calibration dtype, or non-finite weights); try --set calib.dtype=float32"
        )


def collect_stats(
    block: nn.Module,
    targets: dict[str, nn.Module],
    inputs: list[Tensor],
    kwargs: list[dict],
    with_hessian: bool,
    stop_after: str | None = None,
    norms: tuple[float, ...] = (1.0, 2.0, math.inf),
) -> dict[str, LayerStats]:
    """Statistics of the inputs of ``targets`` over all calibration batches.

    Linears fed the same tensor share one LayerStats (q/k/v: one Hessian, not three). Only the
    activation norms in ``norms`` are accumulated. With ``stop_after`` the block's forward ends
    right before that Linear runs (its input is recorded).
    """
    stats: dict[str, LayerStats] = {}
    shared: dict[int, LayerStats] = {}
    alive: list[Tensor] = []

    def hook(name):
        def record(module, args):
            x = args[0]
            if name not in stats:
                owner = shared.get(id(x))
                if owner is None:
                    _check_finite(x, name)
                    owner = LayerStats.empty(x.shape[-1], with_hessian, norms, x.device)
                    owner.add(x)
                    shared[id(x)] = owner
                    alive.append(x)
                stats[name] = owner
            elif shared.get(id(x)) is not stats[name]:
                _check_finite(x, name)
                stats[name].add(x)
                shared[id(x)] = stats[name]
                alive.append(x)
            if name == stop_after:
                raise _StopForward

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        for x, kw in zip(inputs, kwargs, strict=True):
            shared.clear()
            alive.clear()
            with contextlib.suppress(_StopForward):
                block(x, **kw)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def forward_block(block: nn.Module, inputs: list[Tensor], kwargs: list[dict]) -> list[Tensor]:
    """Outputs of ``block`` for every batch (they become the next block's inputs)."""
    outputs = []
    for x, kw in zip(inputs, kwargs, strict=True):
        out = block(x, **kw)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs
