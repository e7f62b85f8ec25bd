"""CPU inference paths for MixedLinear: packed or dequantized forms built once per layer.

The reference (``Backend.TORCH``) dequantizes the whole weight on every call, which dominates
decode time on a CPU. Two cached forms replace it for inference:

* ``dense`` (``Backend.CPU``, what AUTO picks for CPU inference): the weight is dequantized
  once into the compute dtype, exactly as the reference does per call, and kept next to the
  layer; the products are the reference's, so the outputs are bitwise equal to it. One BLAS
  matmul per call: the speed of an unquantized model, at its memory (fp32: 4 bytes/weight).
* ``int4`` (``Backend.CPU_INT4``): torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``),
  weights stay packed at 4 bits. 2- and 3-bit codes are 4-bit codes (widening is exact); the
  zero-point is folded as the kernel's float offset ``scale * (8 - zero)``, exact in fp32. The
  kernel is only vectorised for some CPUs (tools/bench_edge.py measures it), so it is opt-in.

Each cache is keyed on the identity and version counter of the layer's tensors, so copying new
values into a buffer (or replacing it) rebuilds it instead of computing with stale weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gift_quant.kernels.reference import add_salient_and_bias, dequantize_weight
from gift_quant.quant.packing import unpack_cols, unpack_rows

__all__ = ["dense_matmul", "int4_matmul", "int4_unsupported"]

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's CPU int4 kernel accepts
_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "salient_idx", "salient_weight")


def _cached(layer, kind: str, dtype: torch.dtype, build):
    """``build()`` once per (layer tensors, kind, dtype); rebuilt when any tensor changes."""
    key = (kind, dtype, *((id(t), t._version) for t in (getattr(layer, n) for n in _TENSORS)))
    cache = layer.__dict__.setdefault("_cpu_cache", {})
    hit = cache.get(kind)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = cache[kind] = (key, build())
    return hit[1]


def dense_matmul(x: Tensor, layer, base_only: bool = False) -> Tensor:
    """The mixed product with ``dequant(W_q)^T`` [K, N] built once and cached; ``base_only``:
    without the salient product and bias (the base product)."""
    wt = _cached(
        layer,
        "dense",
        x.dtype,
        lambda: dequantize_weight(
            layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, x.dtype
        ),
    )
    y = x @ wt
    return y if base_only else add_salient_and_bias(x, y, layer)


def int4_unsupported(layer) -> str | None:
    """Why torch's int4 CPU kernel cannot compute ``layer`` exactly, or None when it can."""
    K = layer.in_features
    group = K if layer.group_size == -1 else layer.group_size
    if layer.bits > 4:
        return f"{layer.bits}-bit codes do not fit the int4 kernel (2, 3 or 4 bits)"
    if group not in INT4_GROUP_SIZES:
        return f"group size {group} is not one of {INT4_GROUP_SIZES}"
    if K % 32 or layer.out_features % 8:
        return f"shape {layer.out_features}x{K} needs in % 32 == 0 and out % 8 == 0"
    trivial = torch.arange(K, dtype=torch.int32, device=layer.g_idx.device) // group
    if not torch.equal(layer.g_idx, trivial):
        return "g_idx is not contiguous groups (act-order)"
    return None


def _int4_pack(layer) -> tuple[Tensor, Tensor]:
    codes = unpack_rows(layer.qweight, layer.bits).t().contiguous()  # [N, K] in [0, 2**bits)
    zeros = unpack_cols(layer.qzeros, layer.bits).float()  # [G, N]
    scales = layer.scales.float()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    # kernel: w = (q - 8) * scale + offset; ours: scale * (q - zero) -> offset = scale * (8 - zero)
    scales_and_offsets = torch.stack([scales, scales * (8 - zeros)], dim=-1).contiguous()
    return packed, scales_and_offsets


def int4_matmul(x: Tensor, layer, base_only: bool = False) -> Tensor:
    """The mixed product with the base from torch's int4 CPU kernel (computed in fp32)."""
    reason = int4_unsupported(layer)
    if reason is not None:
        raise ValueError(f"backend='cpu_int4' cannot run this layer: {reason}; use 'cpu'")
    packed, sz = _cached(layer, "int4", torch.float32, lambda: _int4_pack(layer))
    group = layer.in_features if layer.group_size == -1 else layer.group_size
    x2 = x.reshape(-1, layer.in_features).float()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, sz)
    y = y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)
    return y if base_only else add_salient_and_bias(x, y, layer)
