"""Perplexity on non-overlapping token windows, and bits-per-weight accounting."""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import cast_params

__all__ = ["bits_report", "perplexity"]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict:
    """exp(mean next-token NLL) over ``windows`` [n, L]; each window predicts L - 1 tokens.

    Parameters are cast to ``dtype`` (buffers keep theirs, as with ``from_pretrained``) for
    the duration of the call and get their dtype back afterwards; trainable ones (fp32 masters
    evaluated mid-training) get their very tensors back, never a rounded copy.
    Returns ``{"perplexity", "nll", "tokens", "windows", "seconds"}``.
    """
    t0 = time.perf_counter()
    params = [
        (p, p.device, p.dtype, p.data if p.requires_grad else None) for p in model.parameters()
    ]
    model.to(device)
    cast_params(model, dtype)
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
        for p, dev, dt, master in params:
            p.data = master if master is not None else p.data.to(device=dev, dtype=dt)
        if params:
            model.to(params[0][1])
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
