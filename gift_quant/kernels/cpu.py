"""CPU inference paths for MixedLinear: packed or dequantized forms built once per layer.

The reference (``Backend.TORCH``) dequantizes the whole weight on every call in several torch
passes, which dominates decode time on a CPU. For inference (no grad) on CPU tensors:

* ``packed`` (``Backend.CPU_PACKED``): the codes stay at 4 bits (2- and 3-bit codes widened,
  which is exact) and a small C kernel (``cpu_gemv.c``, built once for this CPU, see
  ``cpu_native.py``) computes the whole mixed layer -- base, salient columns and bias -- for
  a few rows in one call, in fp32: ``s_g * (sum_k x_k q_k - z_g sum_k x_k)`` per group, each
  ``x_k q_k`` one rounding.
  Decode reads 4 bits per weight instead of 32.
* ``dense`` (``Backend.CPU_DENSE``): the weight dequantized once into the compute dtype and
  kept; the products are the reference's, so the outputs are bitwise equal to it. The speed of
  an unquantized model, at its memory (fp32: 4 bytes per weight).
* ``int4`` (``Backend.CPU_INT4``): torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``);
  2- and 3-bit codes widened, the zero-point folded as the kernel's float offset
  ``scale * (8 - zero)``, exact in fp32. Only vectorised for some CPUs: 3.9-49x slower than an
  fp32 matmul at 1-64 rows on an AVX2 machine (docs/KERNELS-NOTES.md), so it is opt-in.

``Backend.CPU`` (what AUTO picks for CPU inference) routes per call: the packed kernel for up to
``PACKED_MAX_ROWS`` rows (decode), and for more rows (prefill, scoring) the weight dequantized
by the same kernel into a scratch tensor -- bitwise the reference's weight -- then the
reference's products, so no dense copy of the model is kept. Layers the kernel cannot compute
(8-bit, act-order, odd shapes) and machines without a C compiler use ``dense``.

Each cache is keyed on the identity and version counter of the layer's tensors, so copying new
values into a buffer (or replacing it) rebuilds it instead of computing with stale weights.

Under ``torch.compile`` the kernel calls (ctypes, which Dynamo cannot trace) go through two
opaque custom ops, ``gift_quant::cpu_mixed`` and ``gift_quant::cpu_head``, which take the
layer's tensors and run the same code eagerly: a compiled decode step is one graph around them
instead of a graph break at every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from gift_quant.kernels import cpu_native
from gift_quant.kernels.reference import add_salient_and_bias, dequantize_weight
from gift_quant.quant.base import contiguous_group
from gift_quant.quant.packing import unpack_cols, unpack_rows

__all__ = [
    "auto_matmul",
    "cached_form",
    "compiled_matmul",
    "dense_matmul",
    "int4_matmul",
    "int4_unsupported",
    "packed_matmul",
    "packed_unsupported",
    "set_cpu_head",
]

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's CPU int4 kernel accepts
PACKED_MAX_ROWS = 32  # rows up to which the packed kernel beat dequantize + matmul here
_BUFFERS = ("qweight", "qzeros", "scales", "g_idx", "salient_idx", "salient_weight")


def _tensors(layer) -> list:
    """The tensors a cached form is built from (read from the module's dicts: this runs on every
    call, and ``nn.Module.__getattr__`` is slow)."""
    buffers = layer.__dict__.get("_buffers")
    if buffers is None:  # any object holding the tensors as attributes
        return [getattr(layer, n) for n in _BUFFERS] + [getattr(layer, "bias", None)]
    return [buffers[n] for n in _BUFFERS] + [layer._parameters.get("bias")]


class _Cache(dict):
    """A layer's cached forms; copies and pickles of the layer start without them (they hold
    ctypes pointers into this layer's tensors) and rebuild them on first use."""

    def __deepcopy__(self, memo):
        return _Cache()

    def __reduce__(self):
        return _Cache, ()


def cached_form(layer, kind: str, dtype: torch.dtype, build):
    """``build()`` once per (layer tensors, kind, dtype); rebuilt when any tensor changes."""
    tensors = _tensors(layer)
    key = (kind, dtype, *map(id, tensors), *[-1 if t is None else t._version for t in tensors])
    cache = layer.__dict__.get("_cpu_cache")
    if cache is None:
        cache = layer.__dict__["_cpu_cache"] = _Cache()
    hit = cache.get(kind)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = cache[kind] = (key, build())
    return hit[1]


def dense_matmul(x: Tensor, layer, base_only: bool = False) -> Tensor:
    """The mixed product with ``dequant(W_q)^T`` [K, N] built once and cached; ``base_only``:
    without the salient product and bias (the base product)."""
    wt = cached_form(
        layer,
        "dense",
        x.dtype,
        lambda: dequantize_weight(
            layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, x.dtype
        ),
    )
    y = x @ wt
    return y if base_only else add_salient_and_bias(x, y, layer)


def packed_unsupported(layer) -> str | None:
    """Why the packed kernel cannot compute ``layer`` here, or None when it can."""
    reason = cpu_native.native_unsupported(layer)
    if reason is None and cpu_native.library() is None:
        reason = "the packed kernel could not be built on this machine (no C compiler?)"
    return reason


def _packed(layer) -> cpu_native.NativeLayer | None:
    """The layer in the kernel's layout, or None when the kernel cannot compute it."""
    return cached_form(
        layer,
        "packed",
        torch.float32,
        lambda: cpu_native.pack(layer) if packed_unsupported(layer) is None else None,
    )


def packed_matmul(x: Tensor, layer, base_only: bool = False) -> Tensor:
    """The mixed product by the packed kernel, any number of rows, computed in fp32."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("backend='cpu_packed' is for inference (no grad); use 'cpu' or 'torch'")
    packed = _packed(layer)
    if packed is None:
        reason = packed_unsupported(layer)
        raise ValueError(f"backend='cpu_packed' cannot run this layer: {reason}; use 'cpu'")
    return _run_packed(x, layer, packed, base_only)


def _run_packed(x: Tensor, layer, packed, base_only: bool) -> Tensor:
    xf = x if x.dtype is torch.float32 and x.is_contiguous() else x.float().contiguous()
    y = cpu_native.mixed_gemm(xf, packed, base_only)
    return y if x.dtype is torch.float32 else y.to(x.dtype)


def auto_matmul(x: Tensor, layer, base_only: bool = False) -> Tensor:
    """``Backend.CPU``: the fastest exact route for this call (module docstring)."""
    if torch.compiler.is_compiling() and not torch.is_grad_enabled():
        return compiled_matmul(x, layer, base_only)  # the same, as an op the graph keeps
    packed = _packed(layer)
    if packed is None:
        return dense_matmul(x, layer, base_only)
    grad = x.requires_grad and torch.is_grad_enabled()  # the C kernel has no backward
    if x.numel() <= PACKED_MAX_ROWS * layer.in_features and not grad:
        return _run_packed(x, layer, packed, base_only)
    wt = cpu_native.dequantize(packed)  # bitwise the reference's weight
    y = x @ (wt if wt.dtype == x.dtype else wt.to(x.dtype))
    return y if base_only else add_salient_and_bias(x, y, layer)


class CpuHead(nn.Linear):
    """The output Linear (lm_head) of a model on the CPU path: for up to ``PACKED_MAX_ROWS``
    rows without grad, computed by the kernel from an fp16 copy of the weight when every weight
    is an fp16 value -- an export stores the unquantized tensors in fp16, so loading it in fp32
    only widens them and the copy is exact -- which halves the bytes an fp32 decode step reads
    for it (SmolLM2's tied 49152 x 576 head is as large as half its quantized Linears). Else,
    and for anything else, ``nn.Linear``. The weight itself (tied or not) is left as it is."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.bias is None
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and x.numel() <= PACKED_MAX_ROWS * self.in_features
        ):
            if torch.compiler.is_compiling():
                return torch.ops.gift_quant.cpu_head(x, self.weight)
            return _head_matmul(x, self.weight)
        return super().forward(x)


_HALF = WeakIdKeyDictionary()  # head weight -> (version, form)


def _half_weight(w: Tensor) -> cpu_native.HalfWeight | None:
    """The kernel's fp16 copy of a head weight (None when a weight is not an fp16 value), built
    once per weight and version."""
    hit = _HALF.get(w)
    if hit is None or hit[0] != w._version:
        with torch.no_grad():
            ok = cpu_native.half_unsupported(w) is None
            hit = _HALF[w] = (w._version, cpu_native.HalfWeight(w) if ok else None)
    return hit[1]


def _head_matmul(x: Tensor, w: Tensor) -> Tensor:
    half = _half_weight(w)
    if half is None:
        return F.linear(x, w)
    xf = x if x.dtype is torch.float32 and x.is_contiguous() else x.float().contiguous()
    y = cpu_native.half_gemm(xf, half)
    return y if x.dtype is torch.float32 else y.to(x.dtype)


def set_cpu_head(model: nn.Module, enabled: bool = True) -> bool:
    """Compute ``model``'s output Linear by :class:`CpuHead` (or, ``enabled=False``, as a plain
    ``nn.Linear`` again); True when the model has such a head. The module keeps its tensors."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if not isinstance(head, nn.Linear) or type(head) not in (nn.Linear, CpuHead):
        return False
    head.__class__ = CpuHead if enabled else nn.Linear
    return True


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
    if contiguous_group(layer) is None:
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
    packed, sz = cached_form(layer, "int4", torch.float32, lambda: _int4_pack(layer))
    group = layer.in_features if layer.group_size == -1 else layer.group_size
    x2 = x.reshape(-1, layer.in_features).float()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, sz)
    y = y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)
    return y if base_only else add_salient_and_bias(x, y, layer)


# torch.compile: the kernel calls as opaque ops on the layer's tensors (module docstring)
class _OpLayer:
    """A layer as an op call sees it: the call's tensors and sizes, and the forms cached for
    the layer's codes (``_OP_CACHES``, keyed on the tensors' identities and versions as on a
    layer: ``cached_form``). Made per call: no reference to the tensors outlives it, and
    concurrent calls do not share one."""

    def __init__(self, args, cache: _Cache) -> None:  # args: _cpu_mixed's after x, to group_size
        (self.qweight, self.qzeros, self.scales, self.g_idx, self.salient_idx) = args[:5]
        (self.salient_weight, self.bias, self.bits, self.group_size) = args[5:]
        self.in_features, self.out_features = self.g_idx.numel(), self.scales.shape[1]
        self._cpu_cache = cache


_OP_CACHES = WeakIdKeyDictionary()  # a layer's qweight -> the forms built for it


def release_op_forms(layer) -> None:
    """Drop the forms the ops built for ``layer`` (``release_inference_forms``)."""
    _OP_CACHES.pop(layer.qweight, None)


_MIXED_SCHEMA = (
    "(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, Tensor salient_idx, "
    "Tensor salient_weight, Tensor? bias, int bits, int group_size, bool base_only) -> Tensor"
)


# defined with a plain CPU kernel (torch.library.custom_op's wrapper costs about 8 us more a
# call, 1.7 ms a SmolLM2 decode step)
_LIB = torch.library.Library("gift_quant", "DEF")
_LIB.define("cpu_mixed" + _MIXED_SCHEMA)
_LIB.define("cpu_head(Tensor x, Tensor weight) -> Tensor")


def _cpu_mixed(x, *args):  # args: the layer's tensors, bits, group_size, base_only
    cache = _OP_CACHES.get(args[0])
    if cache is None:
        cache = _OP_CACHES[args[0]] = _Cache()
    return auto_matmul(x, _OpLayer(args[:-1], cache), args[-1])


_LIB.impl("cpu_mixed", _cpu_mixed, "CPU")
_LIB.impl("cpu_head", _head_matmul, "CPU")


@torch.library.register_fake("gift_quant::cpu_mixed", lib=_LIB)
def _(x, qweight, qzeros, scales, *args):
    return x.new_empty(*x.shape[:-1], scales.shape[1])


@torch.library.register_fake("gift_quant::cpu_head", lib=_LIB)
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def compiled_matmul(x: Tensor, layer, base_only: bool = False) -> Tensor:
    """``auto_matmul`` as an op ``torch.compile`` keeps in its graph (inference, CPU)."""
    return torch.ops.gift_quant.cpu_mixed(
        x,
        layer.qweight,
        layer.qzeros,
        layer.scales,
        layer.g_idx,
        layer.salient_idx,
        layer.salient_weight,
        layer.bias,
        layer.bits,
        layer.group_size,
        base_only,
    )
