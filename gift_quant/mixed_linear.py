"""``MixedLinear``: inference form of a quantized Linear (GPTQ tensors + FP16 salient columns)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gift_quant.kernels import Backend, dequant_matmul
from gift_quant.kernels.reference import dequantize_weight
from gift_quant.quant.base import QuantizedWeight

__all__ = ["MixedLinear"]


class MixedLinear(nn.Module):
    """``y = x @ dequant(W_q)^T + x[..., S] @ W_S^T + bias``.

    Buffers (GPTQ layout, docs/FORMAT.md; zero-points stored as they are, i.e.
    the v2 convention, the export adds v1's -1 where it writes v1):
        qweight: [K*bits/32, N] int32, codes packed along K; salient columns hold the zero-point.
        qzeros: [G, N*bits/32] int32, zero-points packed along N.
        scales: [G, N] float16.
        g_idx: [K] int32, group of each input column.
        salient_idx: [k] int32, sorted input columns kept in FP16.
        salient_weight: [N, k] float16.

    Parameter: ``bias`` [N] (model dtype, frozen: requires_grad False) or None. Being a
    parameter, it follows ``cast_params`` and every parameter-wise cast like any Linear's bias;
    the file format is unchanged (it is stored as ``<name>.bias``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        num_salient: int,
        bias: bool,
        sym: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        backend: Backend | str = Backend.AUTO,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.backend = Backend(backend)
        K, N = in_features, out_features
        G = 1 if group_size == -1 else K // group_size
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(K * bits // 32, N, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(G, N * bits // 32, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(G, N, dtype=torch.float16, **kw))
        self.register_buffer("g_idx", torch.zeros(K, dtype=torch.int32, **kw))
        self.register_buffer("salient_idx", torch.zeros(num_salient, dtype=torch.int32, **kw))
        self.register_buffer(
            "salient_weight", torch.zeros(N, num_salient, dtype=torch.float16, **kw)
        )
        frozen_bias = nn.Parameter(torch.zeros(N, dtype=dtype, **kw), requires_grad=False)
        self.register_parameter("bias", frozen_bias if bias else None)

    @classmethod
    def empty(
        cls,
        spec: dict,
        *,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        backend: Backend | str = Backend.AUTO,
    ) -> MixedLinear:
        """An unfilled layer of the shape a checkpoint header describes, for the loaders to fill.

        ``spec`` is one entry of an export's ``quantization_config["modules"]``: in_features,
        out_features, bits, group_size, sym, num_salient, bias. ``dtype`` is the bias dtype.
        """
        return cls(
            spec["in_features"],
            spec["out_features"],
            bits=spec["bits"],
            group_size=spec["group_size"],
            num_salient=spec["num_salient"],
            bias=spec["bias"],
            sym=spec["sym"],
            dtype=dtype,
            device=device,
            backend=backend,
        )

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: Tensor | None, dtype: torch.dtype = torch.float16
    ) -> MixedLinear:
        N, K = qw.shape
        layer = cls(
            K,
            N,
            bits=qw.bits,
            group_size=qw.group_size,
            num_salient=qw.salient_idx.numel(),
            bias=bias is not None,
            sym=qw.sym,
            dtype=dtype,
            device=qw.codes.device,
        )
        tensors = qw.to_gptq()
        tensors["salient_idx"] = qw.salient_idx.to(torch.int32)
        tensors["salient_weight"] = qw.salient_weight.to(torch.float16)
        if bias is not None:
            tensors["bias"] = bias.detach().to(dtype)
        for name, t in tensors.items():
            getattr(layer, name).copy_(t)
        return layer

    _FIXED_DTYPES = ("scales", "salient_weight")

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` / ``.half()`` cast every floating tensor, but the stored format keeps
        fp16 scales and salient columns: the kernels read the scales as fp16 bits, and an export
        written after such a cast must still be the same format (integer buffers are never cast
        by torch)."""
        keep = {name: getattr(self, name).dtype for name in self._FIXED_DTYPES}
        super()._apply(fn, recurse)
        for name, dtype in keep.items():
            t = getattr(self, name)
            if t.dtype != dtype:
                self._buffers[name] = t.to(dtype)
        return self

    @property
    def num_salient(self) -> int:
        return self.salient_idx.numel()

    def forward(self, x: Tensor) -> Tensor:
        return dequant_matmul(x, self, self.backend)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight [N, K] this layer computes with: the dequantized codes plus the
        salient columns (whose codes hold the zero-point, so they add to zero; a fused layer's
        union of salient columns keeps each member's own codes where they are not its own)."""
        w = dequantize_weight(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype
        ).t()
        w = w.contiguous()
        if self.num_salient:
            w[:, self.salient_idx.long()] += self.salient_weight.to(dtype)
        return w

    def storage_bits(self) -> int:
        """Bits this layer stores: codes, scales, zeros, salient columns and their indices.

        Zeros count even when symmetric, because the GPTQ layout stores them. g_idx and bias are
        not counted: g_idx is implied by group_size for contiguous groups, and a bias is an
        ordinary FP tensor of any Linear.
        """
        K, N = self.in_features, self.out_features
        G = self.scales.shape[0]
        return K * N * self.bits + G * N * (16 + self.bits) + self.num_salient * (16 * N + 32)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, salient={self.num_salient}, "
            f"bias={self.bias is not None}"
        )
