"""``dequant_matmul(x, layer, backend)``: the mixed-precision matmul and its backends."""

from __future__ import annotations

from enum import StrEnum

from torch import Tensor

from gift_quant.kernels import reference

__all__ = ["Backend", "base_matmul", "dequant_matmul", "resolve_backend"]


class Backend(StrEnum):
    AUTO = "auto"  # TRITON when the tensors are on a GPU and Triton imports, else TORCH
    TORCH = "torch"  # dequantize-then-matmul reference; runs everywhere, including CPU CI
    TRITON = "triton"  # fused dequant kernel; CUDA only


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
    usable = x.is_cuda and triton_available()
    if requested is Backend.AUTO:
        return Backend.TRITON if usable else Backend.TORCH
    if not usable:
        raise RuntimeError("backend='triton' needs a CUDA tensor and an importable triton")
    return requested


def dequant_matmul(x: Tensor, layer, backend: Backend | str = Backend.AUTO) -> Tensor:
    """y = x @ dequant(W_q)^T + x[..., S] @ W_S^T + bias, by the chosen backend."""
    if resolve_backend(backend, x) is Backend.TRITON:
        from gift_quant.kernels.triton import ops as triton_ops

        return triton_ops.dequant_matmul(x, layer)
    return reference.dequant_matmul(x, layer)


def base_matmul(x: Tensor, layer, backend: Backend | str = Backend.AUTO) -> Tensor:
    """x @ dequant(W_q)^T without the salient product or bias; differentiable in ``x``
    (the training form adds noise and trainable salient columns around it)."""
    if resolve_backend(backend, x) is Backend.TRITON:
        from gift_quant.kernels.triton import ops as triton_ops

        return triton_ops.base_matmul(x, layer)
    return reference.base_matmul(x, layer)
