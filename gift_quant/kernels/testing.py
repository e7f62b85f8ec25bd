"""Random mixed layers and the error bound the kernel checks use (tests, tools/check_kernels.py).

A kernel may not be worse than ``ERROR_FACTOR`` times the torch reference's own error in the
same dtype, both measured against a float64 oracle. The factor is 3, not 2: the decode GEMV
accumulates chains of 8 products in f16x2/bf16x2 registers before converting to fp32
(``triton.ptx.deqdot_asm``), where the reference accumulates in fp32 and rounds once; on the
H200 its worst case was 1.91x over 126 checked cases and 2.17x in one graph-replay test
(docs/KERNELS-NOTES.md).
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from gift_quant.quant import QuantizedWeight

__all__ = [
    "ERROR_FACTOR",
    "kernel_error",
    "oracle",
    "random_mixed_linear",
    "random_quantized",
    "run_environment",
]

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
    """A MixedLinear with random codes, zero-points, fp16 scales and salient columns (see
    ``random_quantized``)."""
    from gift_quant.mixed_linear import MixedLinear

    qw, b = random_quantized(
        in_features, out_features, bits, group_size, num_salient, bias, seed, sym
    )
    return MixedLinear.from_quantized(qw, b, dtype=dtype).to(device)


def random_quantized(
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int,
    num_salient: int,
    bias: bool,
    seed: int,
    sym: bool,
) -> tuple[QuantizedWeight, Tensor | None]:
    """Random codes, zero-points, fp16 scales and salient columns, and a bias or None.

    Salient columns hold their group's zero-point code (so they dequantize to exactly 0), as
    every quantizer of the project writes them."""
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
    return qw, (torch.randn(N, generator=g) * 0.1) if bias else None


def oracle(x: Tensor, layer, base_only: bool = False) -> Tensor:
    """The float64 reference output (salient product and bias included unless base_only)."""
    from gift_quant.kernels import reference

    w = reference.dequantize_weight(
        layer.qweight, layer.qzeros, layer.scales.double(), layer.g_idx, layer.bits, torch.float64
    )
    y = x.double() @ w
    if not base_only:
        if layer.salient_idx.numel():
            y = y + x.double()[..., layer.salient_idx.long()] @ layer.salient_weight.double().t()
        if layer.bias is not None:
            y = y + layer.bias.double()
    return y


def kernel_error(out: Tensor, ref: Tensor, exact: Tensor) -> tuple[float, float]:
    """(max |out - exact|, max |ref - exact|); NaN in ``out`` gives an infinite error."""
    if not torch.isfinite(out).all():
        return float("inf"), float((ref.double() - exact).abs().max())
    err = float((out.double() - exact).abs().max())
    return err, float((ref.double() - exact).abs().max())


def run_environment(shared: bool) -> dict:
    """What every JSON row of the kernel tools records: the commit, the versions, the
    processors, and whether other work shared the machine during the run."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=Path(__file__).parent)
        commit += "+uncommitted changes" if dirty.returncode else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return dict(
        commit=commit,
        torch=torch.__version__,
        transformers=transformers.__version__,
        triton=triton_version,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        cpu=cpu,
        shared=shared,
    )
