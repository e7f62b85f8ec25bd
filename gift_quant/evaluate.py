"""Perplexity on non-overlapping token windows, and bits-per-weight accounting."""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from gift_quant.mixed_linear import MixedLinear

__all__ = ["bits_report", "perplexity"]


def _widening(src: torch.dtype, dst: torch.dtype) -> bool:
    """A cast from ``src`` to ``dst`` and back is exact."""
    return dst in (torch.float32, torch.float64) and torch.finfo(src).bits <= torch.finfo(dst).bits


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    desc: str = "perplexity",
    keep_trainable: bool = False,
) -> dict:
    """exp(mean next-token NLL) over ``windows`` [n, L]; each window predicts L - 1 tokens.

    Parameters are cast to ``dtype`` (buffers keep theirs, as with ``from_pretrained``) for the
    duration of the call and get their values back afterwards (their own tensors where the cast
    loses precision). ``keep_trainable`` (an evaluation mid-training) leaves the parameters that
    require grad as they are: fp32 masters whose modules cast them on use; swapping their
    tensors would also detach the gradient hooks of a DDP run.
    Returns ``{"perplexity", "nll", "tokens", "windows", "seconds"}``.
    """
    t0 = time.perf_counter()
    first = next(iter(model.parameters()), None)
    home = None if first is None else first.device
    model.to(device)
    saved = []
    for p in model.parameters():
        if (keep_trainable and p.requires_grad) or not p.is_floating_point() or p.dtype == dtype:
            continue
        saved.append((p, p.dtype, None if _widening(p.dtype, dtype) else p.data))
        p.data = p.data.to(dtype)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for batch in tqdm(windows.split(batch_size), desc=desc, disable=not progress):
            ids = batch.to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                ids[:, 1:].reshape(-1),
                reduction="sum",
            )
            nll += float(loss)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
        for p, dt, original in saved:
            p.data = original if original is not None else p.data.to(dt)
        if home is not None:
            model.to(home)
    mean = nll / count
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": count,
        "windows": int(windows.shape[0]),
        "seconds": time.perf_counter() - t0,
    }


def bits_report(model: nn.Module) -> dict:
    """Stored bits of the quantized Linears, and bytes of the whole model (rest at its dtype)."""
    mixed = [m for m in model.modules() if isinstance(m, MixedLinear)]
    q_bits = sum(m.storage_bits() for m in mixed)
    q_weights = sum(m.in_features * m.out_features for m in mixed)
    owned = {id(t) for m in mixed for t in m.buffers()}  # the bias is a parameter: "other"
    other = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in owned}
    other_bits = sum(t.numel() * t.element_size() * 8 for t in other.values())
    return {
        "bits_per_weight": q_bits / q_weights if q_weights else 16.0,
        "quantized_weights": q_weights,
        "quantized_bytes": q_bits // 8,
        "model_bytes": (q_bits + other_bits) // 8,
    }
