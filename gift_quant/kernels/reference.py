"""The torch reference of the mixed-precision matmul: the spec, the CPU path, the test oracle.

    y = x @ dequant(W_q)^T + x[..., S] @ W_S^T (+ bias)

``dequant`` reads the GPTQ tensors as stored (docs/FORMAT.md): codes unpacked from ``qweight``
[K*b/32, N], true zero-points unpacked from ``qzeros`` [G, N*b/32], fp16 ``scales`` [G, N],
``g_idx`` [K]. Salient columns hold zero-point codes, so they dequantize to exactly 0 and the
FP16 columns ``salient_weight`` [N, k] at ``salient_idx`` [k] add their own product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gift_quant.quant.packing import unpack_cols, unpack_rows

__all__ = [
    "add_salient_and_bias",
    "base_matmul",
    "dequantize_codes",
    "dequantize_weight",
    "dequant_matmul",
]


def dequantize_weight(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, dtype: torch.dtype
) -> Tensor:
    """W^T as [K, N] in ``dtype`` (salient columns are 0)."""
    codes, zeros = unpack_rows(qweight, bits), unpack_cols(qzeros, bits)
    return dequantize_codes(codes, zeros, scales, g_idx, dtype)


def dequantize_codes(
    codes: Tensor, zeros: Tensor, scales: Tensor, g_idx: Tensor, dtype: torch.dtype
) -> Tensor:
    """``scales[g] * (codes - zeros[g])`` for codes [K, N], zeros/scales [G, N], g = g_idx[k]."""
    K, N = codes.shape
    G = zeros.shape[0]
    if K % G == 0:
        g = K // G
        if torch.equal(g_idx, torch.arange(K, device=g_idx.device, dtype=g_idx.dtype) // g):
            # contiguous groups: broadcast instead of gathering [K, N] zeros and scales
            q = codes.reshape(G, g, N) - zeros.reshape(G, 1, N)
            return (q.to(dtype) * scales.reshape(G, 1, N).to(dtype)).reshape(K, N)
    gi = g_idx.long()
    return (codes - zeros[gi]).to(dtype) * scales[gi].to(dtype)


def base_matmul(x: Tensor, layer) -> Tensor:
    """``x @ dequant(W_q)^T`` only (no salient product, no bias); differentiable in ``x``."""
    wt = dequantize_weight(
        layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, x.dtype
    )
    return x @ wt


def dequant_matmul(x: Tensor, layer) -> Tensor:
    """Reference forward of a mixed layer (any object with the GPTQ + salient tensors)."""
    return add_salient_and_bias(x, base_matmul(x, layer), layer)


def add_salient_and_bias(x: Tensor, y: Tensor, layer) -> Tensor:
    """``y + x[..., S] @ W_S^T + bias``: the FP16 side of the mixed product, added to the base
    product ``y`` (shared by every torch path so they round the same way)."""
    if layer.salient_idx.numel():
        y = y + x[..., layer.salient_idx] @ layer.salient_weight.to(x.dtype).t()
    if layer.bias is not None:
        y = y + layer.bias.to(x.dtype)
    return y
