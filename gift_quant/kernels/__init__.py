"""``dequant_matmul(x, layer, backend)``: the mixed-precision matmul and its backends."""

from __future__ import annotations

from enum import StrEnum

import torch
from torch import Tensor

from gift_quant.kernels import cpu, reference

__all__ = [
    "ACTIVATION_DTYPES",
    "Backend",
    "base_matmul",
    "dequant_matmul",
    "release_inference_forms",
    "resolve_backend",
]


# the activation types the GPU kernels take, by the short names the tools and records use
ACTIVATION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Backend(StrEnum):
    AUTO = "auto"  # TRITON on a GPU with Triton; CPU for CPU inference (no grad); else TORCH
    TORCH = "torch"  # dequantize-then-matmul reference; runs everywhere, including CPU CI
    TRITON = "triton"  # fused dequant kernel; CUDA only
    CPU = "cpu"  # CPU inference, the fastest exact route per call (kernels/cpu.py); CPU tensors
    CPU_PACKED = "cpu_packed"  # the packed C kernel for any number of rows (2-4 bits)
    CPU_DENSE = "cpu_dense"  # weight dequantized once and cached: bitwise TORCH, fp32 memory
    CPU_INT4 = "cpu_int4"  # torch's int4 CPU kernel, weights stay packed; <= 4 bits, opt-in


_CPU = {
    Backend.CPU: cpu.auto_matmul,
    Backend.CPU_PACKED: cpu.packed_matmul,
    Backend.CPU_DENSE: cpu.dense_matmul,
    Backend.CPU_INT4: cpu.int4_matmul,
}


def triton_available() -> bool:
    try:
        from gift_quant.kernels.triton import ops as triton_ops  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: Backend | str, x: Tensor) -> Backend:
    requested = Backend(requested)
    if requested is Backend.TORCH:
        return requested
    if requested in _CPU:
        if x.is_cuda:
            raise RuntimeError(f"backend={requested.value!r} needs CPU tensors")
        return requested
    usable = x.is_cuda and triton_available()
    if requested is Backend.AUTO:
        if usable:
            return Backend.TRITON
        # inference on the CPU: the cached form; with grad enabled (training) the reference,
        # whose weight is rebuilt every call and so never holds a stale copy
        cpu_inference = x.device.type == "cpu" and not torch.is_grad_enabled()
        return Backend.CPU if cpu_inference else Backend.TORCH
    if not usable:
        raise RuntimeError("backend='triton' needs a CUDA tensor and an importable triton")
    return requested


def dequant_matmul(x: Tensor, layer, backend: Backend | str = Backend.AUTO) -> Tensor:
    """y = x @ dequant(W_q)^T + x[..., S] @ W_S^T + bias, by the chosen backend."""
    if backend is Backend.AUTO and x.device.type == "cpu" and not torch.is_grad_enabled():
        return cpu.auto_matmul(x, layer)  # CPU inference, every decode step: skip the rest
    chosen = resolve_backend(backend, x)
    if chosen is Backend.TRITON:
        from gift_quant.kernels.triton import ops as triton_ops

        return triton_ops.dequant_matmul(x, layer)
    if chosen in _CPU:
        return _CPU[chosen](x, layer)
    return reference.dequant_matmul(x, layer)


def release_inference_forms(layer) -> None:
    """Drop what inference calls built and cached on ``layer`` beside its buffers (the CPU
    kernels' cached forms; the CUDA kernels' copy of the codes): GIFT-SW calls this on each
    layer it trains around, which an evaluation before training may have filled, so that
    training does not hold that memory. The next inference call builds them again."""
    layer.__dict__.pop("_cpu_cache", None)
    cpu.release_op_forms(layer)
    if triton_available():
        from gift_quant.kernels.triton import ops as triton_ops

        triton_ops.release_cuda_layout(layer)


def base_matmul(x: Tensor, layer, backend: Backend | str = Backend.AUTO) -> Tensor:
    """x @ dequant(W_q)^T without the salient product or bias; differentiable in ``x``
    (the training form adds noise and trainable salient columns around it)."""
    chosen = resolve_backend(backend, x)
    if chosen is Backend.TRITON:
        from gift_quant.kernels.triton import ops as triton_ops

        return triton_ops.base_matmul(x, layer)
    if chosen in _CPU:
        return _CPU[chosen](x, layer, base_only=True)
    return reference.base_matmul(x, layer)
