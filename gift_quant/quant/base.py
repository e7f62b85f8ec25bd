"""What every quantizer returns (QuantizedWeight) and the shape rules of the GPTQ layout.

The quantizers themselves (gptq.py, rtn.py) import this module; ``QUANTIZERS``
(gift_quant.registry, re-exported here) names them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gift_quant.quant.grid import dequantize
from gift_quant.quant.packing import pack_cols, pack_rows
from gift_quant.registry import QUANTIZERS

__all__ = [
    "QUANTIZERS",
    "QuantizedWeight",
    "Quantizer",
    "check_shape",
    "contiguous_group",
    "group_index",
]


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized Linear: integer codes over all K input columns + FP salient columns.

    Salient columns keep a code equal to their group's zero-point, so they dequantize to
    exactly 0 and the layer is ``dequant(codes) + scatter(salient_weight)``.

    Fields:
        codes: [N, K] int32 in [0, 2**bits).
        scales: [N, G] float32, fp16-exact.
        zeros: [N, G] float32, integer-valued true zero-points (no GPTQ v1 "-1").
        g_idx: [K] int32, group of each input column.
        salient_idx: [k] int64, sorted.
        salient_weight: [N, k] float32 (after GPTQ's error compensation).
        bits, group_size (-1 = whole row), sym.
        loss: GPTQ's proxy loss sum (w - q)^2 / d^2 / 2 (0 for RTN).
        row_loss: [N] the same loss per output row (GPTQ), so row blocks can be split off.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    salient_idx: Tensor
    salient_weight: Tensor
    bits: int
    group_size: int
    sym: bool
    loss: float = 0.0
    row_loss: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def rows(self, start: int, end: int) -> QuantizedWeight:
        """Output rows [start, end) as a QuantizedWeight of their own (the grid is per row)."""
        row_loss = None if self.row_loss is None else self.row_loss[start:end]
        return dataclasses.replace(
            self,
            codes=self.codes[start:end],
            scales=self.scales[start:end],
            zeros=self.zeros[start:end],
            salient_weight=self.salient_weight[start:end],
            loss=float(row_loss.sum()) if row_loss is not None else self.loss,
            row_loss=row_loss,
        )

    def dequantize(self) -> Tensor:
        """[N, K] float32: the grid values with the salient columns in place."""
        g = self.g_idx.long()
        w = dequantize(self.codes.float(), self.scales[:, g], self.zeros[:, g])
        if self.salient_idx.numel():
            w[:, self.salient_idx] = self.salient_weight
        return w

    def to_gptq(self) -> dict[str, Tensor]:
        """GPTQ-layout tensors (§6.1): qweight, qzeros (true zero-points), scales, g_idx."""
        return {
            "qweight": pack_rows(self.codes.t(), self.bits),
            "qzeros": pack_cols(self.zeros.t().to(torch.int32), self.bits),
            "scales": self.scales.t().to(torch.float16).contiguous(),
            "g_idx": self.g_idx.to(torch.int32),
        }


# (weight [N, K], hessian [K, K] or None, salient_idx [k], cfg: QuantConfig) -> QuantizedWeight
Quantizer = Callable[..., QuantizedWeight]


def group_index(in_features: int, group_size: int) -> Tensor:
    """g_idx for contiguous groups: [K] int32 with column k in group k // group_size."""
    g = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // g


def contiguous_group(layer) -> int | None:
    """The group size of ``layer`` (anything with ``in_features``, ``group_size`` and ``g_idx``)
    where its g_idx is :func:`group_index`'s contiguous groups, else None (act-order)."""
    K = layer.in_features
    group = K if layer.group_size == -1 else layer.group_size
    if K % group:
        return None
    trivial = group_index(K, layer.group_size).to(layer.g_idx.device)
    return group if torch.equal(layer.g_idx, trivial) else None


def check_shape(in_features: int, out_features: int, group_size: int, name: str = "") -> None:
    """Errors for layer shapes the GPTQ layout cannot hold, naming the fix."""
    where = f"{name}: " if name else ""
    if group_size != -1 and in_features % group_size:
        raise ValueError(
            f"{where}quant.group_size={group_size} does not divide the layer width {in_features}; "
            f"use a divisor such as {_divisors(in_features)} or -1 (whole row)"
        )
    if in_features % 32 or out_features % 32:
        raise ValueError(
            f"{where}GPTQ packing needs in and out features divisible by 32, got "
            f"{out_features}x{in_features}; exclude this Linear with model.exclude"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in (32, 64, 128, 256) if n % d == 0] or [n]
