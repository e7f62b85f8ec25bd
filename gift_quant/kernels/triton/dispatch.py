"""Which kernel runs a Triton-backend call, and its launch by name.

* Dispatch by M = rows of x: the kernel ``routes.route`` names by rule (one of the CUDA
  kernels, the split-K GEMV, the tensor-core kernel ``mm`` in one of the ``MM_CONFIGS``, or
  dequantize + cuBLAS), launched by ``run_route``.
* Measured at first use (fp16 or bf16 x, M in TUNE_M where the CUDA kernels are built, M in
  WG_M where the warpgroup kernel is, and M <= 2 for the GEMV's configurations, with or
  without the CUDA kernels: ``routes.timed``): the first call of a layer shape and M bucket on
  a device times the CUDA kernels' configurations (``rules.mmv_configs``, ``rules.configs``,
  ``rules.wg_configs``), the GEMV's (``gemv.gemv_names``) and the rule's Triton kernel, each
  replayed in a CUDA graph over copies of the weights that pass twice the L2 cache, and keeps
  the fastest for the process (``tuned_route``, ``tuning``; the timings stay in ``tuning.record``).
  From then on the same call always takes the same kernel. ``GIFT_QUANT_TUNE=0`` (or a first
  call inside CUDA-graph capture) keeps the rules instead.
* The kernels share one zero-initialised fp32 workspace per device that every launch leaves
  zeroed (``workspace``); calls on one device must not overlap in time (one stream: two
  split-K launches at once would mix their sums, two stream-K launches could also wait on
  each other's flags for ever), and the
  first call of a shape must happen before CUDA-graph capture (it compiles and may grow the
  workspace).
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor

from gift_quant.kernels.cuda import layout, native
from gift_quant.kernels.triton import tuning
from gift_quant.kernels.triton.gemv import gemv, named_split
from gift_quant.kernels.triton.mm import MM_CONFIGS, dequantize, mm, mm_config
from gift_quant.kernels.triton.routes import mma_config, route, timed, tuning_names
from gift_quant.kernels.triton.tiles import on_device

__all__ = ["run", "run_route", "tuned_route", "workspace"]

_WS_MIN_FLOATS = 1 << 22


def tuned_route(
    x2: Tensor,
    q: Tensor,
    sz: Tensor,
    wst: Tensor | None,
    sidx: Tensor | None,
    sal_pos: Tensor | None,
    bias: Tensor | None,
    bits: int,
    group: int,
    cuda: layout.Packed | None,
    timer=None,
) -> str:
    """The kernel for ``x2`` (fp16 or bf16) on a layer, with the CUDA kernels' layout
    (``cuda``) or without (None: the Triton kernels alone): ``route``'s rule where
    ``routes.timed`` says no; else the fastest of ``tuning_names``, measured at the first call
    of (device, shape, M bucket, dtype) and kept (``tuning.choose``; ``timer``: see there)."""
    M, K = x2.shape
    N = sz.shape[1]
    mma = cuda is not None
    if not timed(M, N, native.wg_available(), mma) or not (x2.is_cuda or timer):
        return route(M, N, K, bits, mma=mma)
    nsal = 0 if wst is None else wst.shape[0]
    k = tuning.key(x2.device.index, N, K, bits, group, nsal, M, x2.dtype, mma)
    name = tuning.kept(k)  # the hot path: one dict lookup
    if name is not None:
        return name
    out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    with on_device(x2.device):  # the cluster and wave queries ask the current device
        names = tuning_names(M, N, K, bits, wg=native.wg_available(), group=group, mma=mma)
        # sized here, on the caller's stream, not while timing
        workspace(x2.device, M * N)

    def launcher(w: tuple):
        def launch(name: str) -> None:
            run_route(name, x2, *w[:3], sidx, sal_pos, bias, bits, group, out=out, cuda=w[3])

        return launch

    def launches() -> list:
        """One launcher per copy of the weights the timing cycles over (the layer's first):
        enough copies that the layout a candidate reads (Triton's or the CUDA kernels', about
        the same bytes) passes twice the L2 cache."""
        own = (
            [f.name for f in fields(cuda) if isinstance(getattr(cuda, f.name), Tensor)]
            if mma
            else []
        )
        nbytes = sum(t.nbytes for t in (q, sz, wst) if t is not None)
        if own:
            nbytes = min(nbytes, sum(getattr(cuda, f).nbytes for f in own))
        n = tuning.copies_for(nbytes, x2.device)
        copies = [(q, sz, wst, cuda)]
        for _ in range(n - 1):
            c = replace(cuda, **{f: getattr(cuda, f).clone() for f in own}) if mma else None
            copies.append((q.clone(), sz.clone(), None if wst is None else wst.clone(), c))
        return [launcher(w) for w in copies]

    return tuning.choose(k, names, launches, route(M, N, K, bits, mma=mma), x2.device, timer)


def run_route(
    name: str,
    x2: Tensor,
    q: Tensor,
    sz: Tensor,
    wst: Tensor | None,
    sidx: Tensor | None,
    sal_pos: Tensor | None,
    bias: Tensor | None,
    bits: int,
    group: int,
    out: Tensor | None = None,
    cuda: layout.Packed | None = None,
) -> Tensor:
    """y [M, N] of x2 [M, K] through the kernel ``name`` (``out``: where to write, if given;
    ``cuda``: the CUDA kernels' layout, for "mma:WNxS[kKW][cC]", "mmv:WNxS[dD][cC]" and
    "wg:NTxWxS[cC][tT][s|g]")."""
    M, K = x2.shape
    N = sz.shape[1]
    if name.startswith(("mma:", "mmv:", "wg:")):
        cuda = cuda.for_type(x2.dtype)
        ws, cnt = workspace(x2.device, M * N)  # (stream-K: a scratch of its own, native.py)
        b16 = None if bias is None else bias.to(x2.dtype).contiguous()
        if name.startswith("wg:"):
            return native.mixed_wg(x2, cuda, b16, ws, cnt, *mma_config(name), out=out)
        if name.startswith("mmv:"):
            wn, splits, depth, cl = mma_config(name)
            return native.mixed_mmv(
                x2, cuda, b16, ws, cnt, wn, splits, out=out, depth=depth, cluster=cl
            )
        return native.mixed_mma(x2, cuda, b16, ws, cnt, *mma_config(name), out=out)
    if name == "cublas":
        w = dequantize(q, sz, wst, sal_pos, K, bits=bits, group=group, dtype=x2.dtype)
        if out is None:
            return torch.addmm(bias.to(x2.dtype), x2, w) if bias is not None else x2 @ w
        if bias is not None:
            return torch.addmm(bias.to(x2.dtype), x2, w, out=out)
        return torch.mm(x2, w, out=out)
    ws, cnt = workspace(x2.device, M * N)
    kw = dict(bits=bits, group=group, out=out)
    if name == "gemv":
        return gemv(x2, q, sz, wst, sidx, bias, ws, cnt, **kw)
    if name.startswith("gemv:"):
        return gemv(x2, q, sz, wst, sidx, bias, ws, cnt, split=named_split(name), **kw)
    if name.startswith("mm:"):
        cfg = mm_config(M, N, K, group, **MM_CONFIGS[name[3:]])
        return mm(x2, q, sz, wst, sidx, bias, ws, cnt, config=cfg, **kw)
    raise ValueError(f"unknown kernel {name!r}")


_WORKSPACES: dict[int, tuple[Tensor, Tensor]] = {}


def workspace(device: torch.device, floats: int) -> tuple[Tensor, Tensor]:
    idx = device.index if device.index is not None else 0
    ws = _WORKSPACES.get(idx) if device.type == "cuda" else None
    if ws is None or ws[0].numel() < floats:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "the Triton workspace must grow; run this shape once before capturing a CUDA graph"
            )
        n = max(_WS_MIN_FLOATS, floats)
        ws = (
            torch.zeros(n, dtype=torch.float32, device=device),
            torch.zeros(1 << 16, dtype=torch.int32, device=device),
        )
        if device.type == "cuda":
            _WORKSPACES[idx] = ws
    return ws


def run(
    x: Tensor,
    q: Tensor,
    sz: Tensor,
    wst: Tensor | None,
    sidx: Tensor | None,
    sal_pos: Tensor | None,
    bias: Tensor | None,
    bits: int,
    group: int,
    cuda: layout.Packed | None = None,
) -> Tensor:
    K, N = x.shape[-1], sz.shape[1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):  # the rule where not timed
        name = tuned_route(x2, q, sz, wst, sidx, sal_pos, bias, bits, group, cuda)
    else:
        name = route(M, N, K, bits)
    y = run_route(name, x2, q, sz, wst, sidx, sal_pos, bias, bits, group, cuda=cuda)
    return y.reshape(*x.shape[:-1], N)
