"""Cross-entropy over a causal LM's logits, summed, with its gradient made in the forward pass.

``F.cross_entropy`` on a ``[B, T, V]`` logits tensor, shifted by one position and upcast to
fp32 first, keeps several vocabulary-wide tensors alive for the backward pass: the shifted fp32
copy, the log-softmax, then the gradient of each step back to the logits. With a 49k
vocabulary at 8 x 256 tokens each is 400 MB; with a 128k one at 8 x 2048 tokens, 8 GB. Here
the rows are taken a chunk at a time: each chunk's log-sum-exp gives its loss, and its
gradient ``softmax - onehot`` is written straight into one buffer of the logits' own dtype
(the dtype ``F.cross_entropy(logits.float())``'s backward casts its gradient to; in bf16 or
fp16 it is rounded when stored and again when the backward scales it, within two units in the
last place where torch's path rounds once). Nothing
else vocabulary-wide is made, and no pass over the logits is spent on the shift: the labels
move instead. Pure torch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["causal_ce_sum"]

CHUNK_BYTES = {"cpu": 2 << 20, "cuda": 256 << 20}  # fp32 chunk (CPU: cache-sized)


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
        V = logits.shape[-1]
        x = logits.detach().reshape(-1, V)
        y = labels.reshape(-1)
        grad = torch.empty_like(x)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        rows = max(1, CHUNK_BYTES.get(x.device.type, CHUNK_BYTES["cuda"]) // (4 * V))
        for r0 in range(0, x.shape[0], rows):
            xc, out = x[r0 : r0 + rows].float(), grad[r0 : r0 + rows]
            # fp32 logits: xc is a view of them, worked on in the gradient's rows; else xc is a
            # copy of the chunk, worked on in place
            c = out if out.dtype == torch.float32 else xc
            lab = y[r0 : r0 + rows]
            keep = lab != ignore_index
            at = torch.where(keep, lab, 0)[:, None]
            picked = xc.gather(1, at)
            m = xc.amax(1, keepdim=True)
            s = torch.sub(xc, m, out=c).exp_().sum(1, keepdim=True)
            # an ignored row adds nothing, whatever its logits hold (a masked -inf, a NaN in
            # the last position, which predicts no label)
            total += torch.where(keep, (m + s.log() - picked).squeeze(1), 0.0).sum()
            # softmax - onehot on the kept rows, zero on the others
            c.div_(s).scatter_add_(1, at, -keep[:, None].to(c.dtype))
            c.index_fill_(0, (~keep).nonzero().squeeze(1), 0.0)  # the ignored rows only
            if c is not out:
                out.copy_(c)
        ctx.grad = grad.view(logits.shape)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        if ctx.grad is None:
            raise RuntimeError("causal_ce_sum's backward runs once: its buffer became the gradient")
        grad, ctx.grad = ctx.grad, None  # used once: the buffer becomes the gradient
        return grad.mul_(g), None, None


def causal_ce_sum(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """sum over positions t < T - 1 with ``labels[:, t + 1] != ignore_index`` of
    ``-log softmax(logits[:, t])[labels[:, t + 1]]``, in fp32: what
    ``F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1),
    ignore_index=ignore_index, reduction="sum")`` computes, up to the order of its sums.
    Differentiable in ``logits`` (once)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    return _CrossEntropySum.apply(logits, shifted, ignore_index)
