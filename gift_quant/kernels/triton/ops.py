"""Triton backend of ``dequant_matmul`` / ``base_matmul``: layouts and custom ops.

Importing this module raises ImportError where Triton is missing (``triton_available``).

* Layout (cached on the layer as ``layer._triton_cache``, rebuilt when a buffer's storage or
  version changes): the codes as stored for 2/4 bits, the 3-word units of ``ptx`` for
  3 bits; ``sz`` [G, N] int32 = fp16 scale bits | zero-point << 16; W_S^T [k, N]; the salient
  position of every input column. Layers the kernels do not cover (act-order ``g_idx``,
  8 bits, widths not multiples of 64) run the torch reference. The CUDA kernels' own layout
  (``cuda_layout``) is built beside it where they are compiled.
* Which kernel runs a call, and how it is launched: ``dispatch``.
* ``torch.ops.gift_quant.mixed_matmul`` / ``base_matmul`` are custom ops (opaque to
  torch.compile, with fake implementations) and differentiable in x: grad_x = grad_y @ W runs
  through the same tiles (``mm.backward``; no dense copy of W is kept).
* On sm_90 and later the GEMV and the CUDA kernels launch as programmatic dependents of the
  kernel before them (``rules.dependent_launch``): they read their weights while it finishes,
  and x and the workspace only after it is done. So a layer's layout, once built, is waited
  for (``_settle``: one synchronisation when the Triton layout is built, one when the CUDA
  kernels' is). Weights written without a version bump (through ``.data``, say) are not seen
  as changed, and a dependent launch may read them while the write is still running; direct
  callers of the kernels with freshly written tensors synchronise themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the Triton backend needs the triton package") from exc

from gift_quant.kernels import reference
from gift_quant.kernels.cuda import layout, native
from gift_quant.kernels.cuda.rules import dependent_launch_capable
from gift_quant.kernels.triton.dispatch import run
from gift_quant.kernels.triton.mm import NOISE_KINDS, backward, dequantize
from gift_quant.kernels.triton.ptx import pack_3bit
from gift_quant.quant.base import contiguous_group
from gift_quant.quant.packing import unpack_cols, unpack_rows

__all__ = [
    "base_matmul",
    "dequant_matmul",
    "noisy_weight_t",
    "cuda_layout",
    "prepare",
]


@dataclass
class Prepared:
    """Kernel-side tensors of one MixedLinear."""

    key: tuple
    q: Tensor
    sz: Tensor
    wst: Tensor | None
    sidx: Tensor | None
    sal_pos: Tensor | None
    bits: int
    group: int
    K: int
    N: int
    cuda: layout.Packed | None = None  # the CUDA kernels' layout (``cuda_layout``)
    cuda_checked: bool = False


_SOURCES = ("qweight", "qzeros", "scales", "g_idx", "salient_idx", "salient_weight")


def _key(layer) -> tuple:
    tensors = [getattr(layer, name) for name in _SOURCES]
    return tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors)


def prepare(layer) -> Prepared | None:
    """The cached kernel layout of ``layer``, or None where the kernels do not apply."""
    if torch.compiler.is_compiling():
        return getattr(layer, "_triton_cache", None) or None
    key = _key(layer)
    cache = getattr(layer, "_triton_cache", None)
    if cache is not None and (cache is False or cache.key == key):
        return cache or None
    prepared = _build(layer, key)
    layer._triton_cache = prepared if prepared is not None else False
    if prepared is not None:
        _settle(prepared.q.device)
    return prepared


def _settle(device: torch.device) -> None:
    """After a layout was built: kernels launched as programmatic dependents
    (``rules.dependent_launch``) read their weights before they wait for the kernel before
    them, so the copies that wrote the layout (and the layer's buffers they read) must be done
    before any such launch: on every GPU that can launch so, whether or not ``GIFT_QUANT_PDL``
    turns it on now (it is read at each launch). A layout is never built inside CUDA-graph
    capture: ``_build`` already synchronises, which a capture refuses."""
    if dependent_launch_capable(device):
        torch.cuda.synchronize(device)


def _build(layer, key: tuple) -> Prepared | None:
    K, N, bits = layer.in_features, layer.out_features, layer.bits
    group = K if layer.group_size == -1 else layer.group_size
    if bits not in (2, 3, 4) or N % 64 or K % 32 or group % 32:
        return None
    if contiguous_group(layer) is None:  # act-order: the reference handles it
        return None
    q = layer.qweight if bits != 3 else pack_3bit(unpack_rows(layer.qweight, 3))
    zeros = unpack_cols(layer.qzeros, bits)
    sz = (layer.scales.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF) | (zeros << 16)
    k = layer.salient_idx.numel()
    wst = sidx = sal_pos = None
    if k:
        wst = layer.salient_weight.to(torch.float16).t().contiguous()
        sidx = layer.salient_idx.to(torch.int32).contiguous()
        sal_pos = torch.full((K,), -1, dtype=torch.int32, device=q.device)
        sal_pos[sidx.long()] = torch.arange(k, dtype=torch.int32, device=q.device)
    return Prepared(key, q.contiguous(), sz.contiguous(), wst, sidx, sal_pos, bits, group, K, N)


def cuda_layout(layer) -> layout.Packed | None:
    """The CUDA kernels' layout of ``layer`` (a second copy of the codes, the same size as the
    first), built at its first fp16 call or bf16 call without autograd (``dequant_matmul``)
    and kept in the layer's cache; None where the kernels do not cover the layer or are not
    built. bf16 training never builds it, and GIFT-SW drops one an evaluation before it built
    (``kernels.release_inference_forms``)."""
    prep = prepare(layer)
    if prep is None or prep.cuda is not None or prep.cuda_checked:
        return None if prep is None else prep.cuda
    if (
        layer.qweight.is_cuda
        and layout.unsupported(layer) is None
        and native.library(layer.qweight.device) is not None
    ):
        codes = unpack_rows(layer.qweight, prep.bits)
        zeros = unpack_cols(layer.qzeros, prep.bits)
        packed = layout.pack(codes, zeros, layer.scales, prep.wst, prep.sidx, prep.bits, prep.group)
        _settle(layer.qweight.device)  # before it is kept: a refused layout is built again
        prep.cuda = packed
    prep.cuda_checked = True
    return prep.cuda


def release_cuda_layout(layer) -> None:
    """Forget ``layer``'s CUDA kernels' layout (``cuda_layout`` builds it again when asked)."""
    cache = getattr(layer, "_triton_cache", None)
    if cache:  # None: never prepared; False: the kernels do not cover the layer
        cache.cuda, cache.cuda_checked = None, False


# ------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("gift_quant::mixed_matmul", mutates_args=())
def mixed_matmul(
    x: Tensor,
    q: Tensor,
    sz: Tensor,
    wst: Tensor | None,
    sidx: Tensor | None,
    sal_pos: Tensor | None,
    bias: Tensor | None,
    bits: int,
    group: int,
    cq: Tensor | None = None,
    czp: Tensor | None = None,
    csc: Tensor | None = None,
    cws: Tensor | None = None,
) -> Tensor:
    """x @ dequant(W)^T + x[..., S] @ W_S^T (+ bias) with the packed layout of ``prepare``
    (``cq``, ``czp``, ``csc``, ``cws``: the CUDA kernel's codes, zero-points, scales and
    salient fragments)."""
    cuda = None
    if cq is not None:
        nsal = 0 if wst is None else wst.shape[0]
        si = sidx if sidx is not None else cq.new_zeros(1)
        K, N = x.shape[-1], sz.shape[1]
        cuda = layout.Packed(cq, czp, csc, cws, si, nsal, bits, group, K, N)
    return run(x, q, sz, wst, sidx, sal_pos, bias, bits, group, cuda)


@mixed_matmul.register_fake
def _(x, q, sz, wst, sidx, sal_pos, bias, bits, group, cq=None, czp=None, csc=None, cws=None):
    return x.new_empty(*x.shape[:-1], sz.shape[1])


def _setup(ctx, inputs, output) -> None:
    x, q, sz, wst, sidx = inputs[:5]
    ctx.save_for_backward(q, sz, wst, sidx)
    ctx.meta = (inputs[7], inputs[8], x.shape[-1])


def _backward(ctx, grad):
    q, sz, wst, sidx = ctx.saved_tensors
    bits, group, K = ctx.meta
    g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
    gx = backward(g2, q, sz, K, bits=bits, group=group)
    if wst is not None:  # the salient product's share: columns S of grad_x
        gx.index_add_(1, sidx.long(), g2 @ wst.to(g2.dtype).t())
    return gx.reshape(*grad.shape[:-1], K)


def _mixed_backward(ctx, grad):
    # grad_x, then None for every other input (the optional CUDA-layout tensors included)
    return (_backward(ctx, grad),) + (None,) * (len(ctx.needs_input_grad) - 1)


mixed_matmul.register_autograd(_mixed_backward, setup_context=_setup)


@torch.library.custom_op("gift_quant::base_matmul", mutates_args=())
def base_matmul_op(x: Tensor, q: Tensor, sz: Tensor, bits: int, group: int) -> Tensor:
    """x @ dequant(W)^T only (no salient product, no bias)."""
    return run(x, q, sz, None, None, None, None, bits, group)


@base_matmul_op.register_fake
def _(x, q, sz, bits, group):
    return x.new_empty(*x.shape[:-1], sz.shape[1])


def _setup_base(ctx, inputs, output) -> None:
    x, q, sz, bits, group = inputs
    ctx.save_for_backward(q, sz, None, None)
    ctx.meta = (bits, group, x.shape[-1])


base_matmul_op.register_autograd(
    lambda ctx, g: (_backward(ctx, g), None, None, None, None), setup_context=_setup_base
)


# ------------------------------------------------------------------------------------------
# entry points used by ``gift_quant.kernels``


def _usable(x: Tensor, prep: Prepared | None) -> bool:
    return prep is not None and x.dtype in (torch.float16, torch.bfloat16)


def dequant_matmul(x: Tensor, layer) -> Tensor:
    prep = prepare(layer)
    if not _usable(x, prep):
        return reference.dequant_matmul(x, layer)
    # the CUDA kernels' layout: built at the first fp16 call, and at the first bf16 call without
    # autograd (inference; bf16 training keeps to the Triton kernels and their memory); its
    # salient fragments in x's type (bf16: converted once, kept)
    compiling = torch.compiler.is_compiling()
    build = not compiling and (x.dtype == torch.float16 or not torch.is_grad_enabled())
    c = cuda_layout(layer) if build else prep.cuda
    cws = None if c is None else c.salient_as(x.dtype, build=not compiling)
    return mixed_matmul(
        x,
        prep.q,
        prep.sz,
        prep.wst,
        prep.sidx,
        prep.sal_pos,
        layer.bias,
        prep.bits,
        prep.group,
        *((c.qc, c.zp, c.scp, cws) if cws is not None else (None,) * 4),
    )


def noisy_weight_t(
    layer, wst: Tensor, noise: str, delta: Tensor | None, seed: int, dtype: torch.dtype
) -> Tensor | None:
    """GIFT-SW's training weight of ``layer`` as W^T [K, N] in ``dtype``, in one launch: the
    frozen grid, ``noise`` (normal / uniform / none) of per-output scale ``delta`` drawn from
    ``seed`` on the non-salient rows, and the rows S set to ``wst`` [k, N] (the trainable
    salient columns). None where the kernels do not cover the layer."""
    prep = prepare(layer)
    if prep is None or dtype not in (torch.float16, torch.bfloat16) or noise not in NOISE_KINDS:
        return None  # the torch twin serves it (a registered noise kind the kernel lacks, say)
    wst = wst.to(dtype).contiguous() if prep.sal_pos is not None else None
    return dequantize(
        prep.q,
        prep.sz,
        wst,
        prep.sal_pos,
        prep.K,
        bits=prep.bits,
        group=prep.group,
        dtype=dtype,
        noise=noise,
        delta=delta,
        seed=seed,
    )


def base_matmul(x: Tensor, layer) -> Tensor:
    prep = prepare(layer)
    if not _usable(x, prep):
        return reference.base_matmul(x, layer)
    return base_matmul_op(x, prep.q, prep.sz, prep.bits, prep.group)
