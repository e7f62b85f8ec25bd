"""Random mixed layers and the error bound the kernel checks use (tests, tools/check_kernels.py).

The bound: a kernel may not be worse than ``ERROR_FACTOR`` times the
torch reference's own error in the same dtype, both measured against a float64 oracle. The
factor is 3, not 2: the decode GEMV accumulates chains of 8 products in f16x2 registers before
converting to fp32 (docs/KERNELS-NOTES.md), where the reference accumulates in fp32 and rounds once;
on the H200 its worst case was 1.91x over 126 checked cases and 2.17x in one graph-replay test.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gift_quant.quant import QuantizedWeight

__all__ = ["ERROR_FACTOR", "kernel_error", "oracle", "random_mixed_linear", "read_codes"]

ERROR_FACTOR = 3.0


def random_mixed_linear(
    in_features: int,
    out_features: int,
    *,
    bits: int,
    group_size: int = 128,
    num_salient: int = 0,
    bias: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    sym: bool = False,
):
    """A MixedLinear with random codes, zero-points, fp16 scales and salient columns.

    Salient columns hold their group's zero-point code (so they dequantize to exactly 0), as
    every quantizer of the project writes them."""
    from gift_quant.mixed_linear import MixedLinear

    g = torch.Generator().manual_seed(seed)
    K, N = in_features, out_features
    G = 1 if group_size == -1 else K // group_size
    gs = K if group_size == -1 else group_size
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (N, K), generator=g, dtype=torch.int32)
    if sym:
        zeros = torch.full((N, G), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(0, maxq + 1, (N, G), generator=g).float()
    scales = (torch.rand(N, G, generator=g) * 0.02 + 0.002).half().float()
    g_idx = torch.arange(K, dtype=torch.int32) // gs
    sal = torch.randperm(K, generator=g)[:num_salient].sort().values
    codes[:, sal] = zeros[:, g_idx[sal].long()].to(torch.int32)
    sal_w = torch.randn(N, num_salient, generator=g) * 0.05
    qw = QuantizedWeight(
        codes, scales, zeros, g_idx, sal, sal_w.half().float(), bits, group_size, sym
    )
    b = (torch.randn(N, generator=g) * 0.1) if bias else None
    return MixedLinear.from_quantized(qw, b, dtype=dtype).to(device)


def oracle(x: Tensor, layer, base_only: bool = False) -> Tensor:
    """The float64 output (salient product and bias included unless base_only), computed from
    the stored tensors by :func:`read_codes` -- not by the reference it is used to check."""
    codes = read_codes(layer.qweight, layer.bits)  # [K, N]
    zeros = read_codes(layer.qzeros.t(), layer.bits).t()  # [G, N]
    g = layer.g_idx.long()
    w = layer.scales.double()[g] * (codes - zeros[g]).double()
    y = x.double() @ w
    if not base_only:
        if layer.salient_idx.numel():
            y = y + x.double()[..., layer.salient_idx.long()] @ layer.salient_weight.double().t()
        if layer.bias is not None:
            y = y + layer.bias.double()
    return y


def read_codes(packed: Tensor, bits: int) -> Tensor:
    """Codes [K, N] read bit by bit from GPTQ-packed int32 words [K*bits/32, N].

    A second, literal reading of the layout for the oracle (the words of every 32 values form
    one little-endian stream of 32*bits bits; value j is stream bits [j*bits, (j+1)*bits)),
    independent of the unpacker in quant/packing.py."""
    R, N = packed.shape
    words = packed.to(torch.int64) & 0xFFFFFFFF
    bit = (words.unsqueeze(1) >> torch.arange(32, device=packed.device).view(1, 32, 1)) & 1
    stream = bit.reshape(R // bits, 32, bits, N)  # [word groups, value j, bit t of j, N]
    place = (2 ** torch.arange(bits, device=packed.device)).view(1, 1, bits, 1)
    return (stream * place).sum(2).reshape(R // bits * 32, N)


def kernel_error(out: Tensor, ref: Tensor, exact: Tensor) -> tuple[float, float]:
    """(max |out - exact|, max |ref - exact|); NaN in ``out`` gives an infinite error."""
    if not torch.isfinite(out).all():
        return float("inf"), float((ref.double() - exact).abs().max())
    err = float((out.double() - exact).abs().max())
    return err, float((ref.double() - exact).abs().max())
