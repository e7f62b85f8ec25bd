"""Batched path: ``mm``, a split-K tensor-core GEMM over the packed weights (M > 4), its backward
``grad_x = grad_y @ W`` (training), and ``dequantize`` for the dequantize + cuBLAS route (large M).

``mm`` loads each weight tile packed once per k-block (pipelined by Triton's cp.async stages)
and expands it in registers (``tiles.deq_tile``, natural k order, no inline PTX). SWAP computes
the transposed product y^T [BN, BM] = W [BN, BK] @ x^T [BK, BM]: the weight is the MMA's M side
(wgmma, 64-row warpgroup tiles) and the few rows of x its narrow N side (>= 16), instead of
padding M to 16/64 rows of the MMA. SCALE_ACC (BM <= 32): integer tile, the fp32 product
scaled per group (fewer instructions); else the tile is scaled in the activation dtype. The
salient columns are extra K-slices; split-K partials go through the self-cleaning workspace
(``tiles.store_output``). Named configurations (``MM_CONFIGS``) are what the route tables of
``ops`` pick from.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from gift_quant.kernels.triton.tiles import (
    act,
    deq_tile,
    interpreting,
    on_device,
    salient_dot,
    settle,
    store_output,
)


@triton.jit(do_not_specialize=["M"])
def _mm_kernel(
    # pointers
    x_ptr,
    q_ptr,
    sz_ptr,
    wst_ptr,
    sidx_ptr,
    bias_ptr,
    ws_ptr,
    cnt_ptr,
    y_ptr,
    # sizes
    M,
    N,
    K,
    NSAL,
    N_SPLIT,
    N_SAL_PROGS,
    # meta
    BITS: tl.constexpr,
    BF16: tl.constexpr,
    EMU: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SAL_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DIRECT: tl.constexpr,
    SWAP: tl.constexpr,
    SCALE_ACC: tl.constexpr,
    STAGES: tl.constexpr,
    SETTLE: tl.constexpr,
):
    """x [M, K] f16/bf16; q, sz as in ``deq_tile``; wst [NSAL, N] fp16 (W_S^T); sidx [NSAL]
    int32; bias [N]; ws [M, N] fp32 zeros; cnt [tiles] int32 zeros; y [M, N] like x. Grid
    (N / BLOCK_N, N_SPLIT + N_SAL_PROGS, cdiv(M, BLOCK_M)): programs pid_k < N_SPLIT take an
    even share of the k-blocks, the others SAL_K salient columns each. DIRECT (N_SPLIT == 1):
    one program per tile also does the salient columns and stores y plainly."""
    SCALED: tl.constexpr = not SCALE_ACC
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if pid_k < N_SPLIT:
        n_kb = K // BLOCK_K
        for j in tl.range(
            pid_k * n_kb // N_SPLIT, (pid_k + 1) * n_kb // N_SPLIT, num_stages=STAGES
        ):
            kb = j * BLOCK_K
            offs_k = kb + tl.arange(0, BLOCK_K)
            if SWAP:
                xb = tl.load(
                    x_ptr + offs_m[None, :] * K + offs_k[:, None], mask=mmask[None, :], other=0.0
                )
                w, s = deq_tile(
                    q_ptr, sz_ptr, kb, offs_n, N, GROUP, BITS, BF16, BLOCK_K, True, SCALED, EMU
                )
                a, b, s2 = w, act(xb, BF16, EMU), s[:, None]
            else:
                xa = tl.load(
                    x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mmask[:, None], other=0.0
                )
                w, s = deq_tile(
                    q_ptr, sz_ptr, kb, offs_n, N, GROUP, BITS, BF16, BLOCK_K, False, SCALED, EMU
                )
                a, b, s2 = act(xa, BF16, EMU), w, s[None, :]
            if SCALE_ACC:
                acc += tl.dot(a, b) * s2
            else:
                acc = tl.dot(a, b, acc)
                if SETTLE:  # no MMA left pending at the back-edge (see ``settle``)
                    acc = settle(acc)
    if DIRECT:
        acc = salient_dot(
            acc, x_ptr, wst_ptr, sidx_ptr, offs_m, mmask, offs_n, N, K, 0, NSAL, SWAP, BF16, EMU
        )
    elif pid_k >= N_SPLIT:
        j0 = (pid_k - N_SPLIT) * SAL_K
        j_end = tl.minimum(NSAL, j0 + SAL_K)
        acc = salient_dot(
            acc, x_ptr, wst_ptr, sidx_ptr, offs_m, mmask, offs_n, N, K, j0, j_end, SWAP, BF16, EMU
        )
    if SWAP:
        omask = mmask[None, :] & (offs_n[:, None] < N)
        yoff = offs_m[None, :] * N + offs_n[:, None]
        boff = offs_n[:, None]
    else:
        omask = mmask[:, None] & (offs_n[None, :] < N)
        yoff = offs_m[:, None] * N + offs_n[None, :]
        boff = offs_n[None, :]
    tile = pid_m * tl.num_programs(0) + pid_n
    n_parts = N_SPLIT + N_SAL_PROGS
    store_output(
        acc,
        yoff,
        omask,
        boff,
        boff < N,
        y_ptr,
        bias_ptr,
        ws_ptr,
        cnt_ptr,
        tile,
        n_parts,
        HAS_BIAS,
        DIRECT,
        BF16,
        EMU,
    )


@triton.jit(do_not_specialize=["M"])
def _backward_kernel(
    g_ptr,
    q_ptr,
    sz_ptr,
    gx_ptr,
    M,
    N,
    K,
    BITS: tl.constexpr,
    BF16: tl.constexpr,
    EMU: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    SETTLE: tl.constexpr,
):
    """gx [M, K] = g [M, N] @ dequant(W) [N, K] (no salient part), computed transposed as
    gx^T = W^T @ g^T with the [BK, BN] tile of W^T as the MMA's M side (the forward's SWAP
    form). Grid (K / BLOCK_K, cdiv(M, BLOCK_M)); every program loops over all of N."""
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    kb = pid_k * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    acc = tl.zeros([BLOCK_K, BLOCK_M], tl.float32)
    for nb in tl.range(0, N, BLOCK_N, num_stages=STAGES):
        offs_n = nb + tl.arange(0, BLOCK_N)
        gt = tl.load(g_ptr + offs_m[None, :] * N + offs_n[:, None], mask=mmask[None, :], other=0.0)
        w, _ = deq_tile(q_ptr, sz_ptr, kb, offs_n, N, GROUP, BITS, BF16, BLOCK_K, False, True, EMU)
        acc = tl.dot(w, act(gt, BF16, EMU), acc)
        if SETTLE:  # Triton 3.6 pipelines these MMAs too (see ``settle``)
            acc = settle(acc)
    offs_k = kb + tl.arange(0, BLOCK_K)
    out = act(acc, BF16, EMU).to(gx_ptr.dtype.element_ty)
    tl.store(gx_ptr + offs_m[None, :] * K + offs_k[:, None], out, mask=mmask[None, :])


@triton.jit(do_not_specialize=["seed"])
def _dequant_kernel(
    q_ptr,
    sz_ptr,
    wst_ptr,
    sal_pos_ptr,
    delta_ptr,
    out_ptr,
    N,
    K,
    seed,
    BITS: tl.constexpr,
    BF16: tl.constexpr,
    EMU: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_SAL: tl.constexpr,
    NOISE: tl.constexpr,
):
    """out [K, N] = dequant(W)^T, plus W_S^T[sal_pos[k]] on rows with sal_pos[k] >= 0 (with
    noise: replaced by it).
    NOISE 1 / 2 (GIFT-SW training) adds delta[n] * N(0, 1/4) / U(-1/2, 1/2) to every element
    of the other rows: Philox draws at counter k * N + n of ``seed``, so a launch with the
    same seed rebuilds the same noisy weight (the backward pass does)."""
    kb = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = kb + tl.arange(0, BLOCK_K)
    w, _ = deq_tile(q_ptr, sz_ptr, kb, offs_n, N, GROUP, BITS, BF16, BLOCK_K, False, True, EMU)
    if NOISE != 0:
        counter = offs_k[:, None] * N + offs_n[None, :]
        if NOISE == 1:
            r = tl.randn(seed, counter) * 0.5
        else:
            r = tl.rand(seed, counter) - 0.5
        d = tl.load(delta_ptr + offs_n)
        w = act(w.to(tl.float32) + r * d[None, :], BF16, EMU)
    if HAS_SAL:
        pos = tl.load(sal_pos_ptr + offs_k)
        sal = tl.load(
            wst_ptr + tl.maximum(pos, 0)[:, None] * N + offs_n[None, :],
            mask=(pos >= 0)[:, None],
            other=0.0,
        )
        if NOISE == 0:  # added: the codes there dequantize to 0 (a fused layer's need not)
            w = tl.where((pos >= 0)[:, None], act(w.to(tl.float32) + sal, BF16, EMU), w)
        else:  # training: the salient rows carry no noise
            w = tl.where((pos >= 0)[:, None], act(sal, BF16, EMU), w)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------
# configurations and launchers

# Named configurations of ``mm`` (the route tables in ``ops`` refer to them by name).
# t*: swapped orientation (wgmma, weight tile as the LHS), n*: x as the LHS; the number is
# BLOCK_N; k: BLOCK_K 64 (4-bit: 8 word rows per tile instead of 16, 1.3x faster at M <= 16);
# s: twice the programs; w: tile scaled in the activation dtype, BLOCK_K 64 (for BLOCK_M >=
# 64); r: 396 programs instead of 264 (no register cap: see ``tiles.settle``). ``programs``:
# the split-K target (132 SMs, 2-4 resident programs each; salient programs come on top).
MM_CONFIGS: dict[str, dict] = {
    "t128": dict(swap=True, block_n=128, block_k=128, programs=264),
    "t128s": dict(swap=True, block_n=128, block_k=128, programs=528),
    "t64": dict(swap=True, block_n=64, block_k=128, programs=528),
    "t64k": dict(swap=True, block_n=64, block_k=64, programs=528),
    "n128": dict(swap=False, block_n=128, block_k=128, programs=264),
    "t128w": dict(swap=True, block_n=128, block_k=64, programs=264, scale_acc=False),
    "t128wr": dict(swap=True, block_n=128, block_k=64, programs=396, scale_acc=False),
}


def mm_config(
    M: int,
    N: int,
    K: int,
    group: int,
    *,
    block_n: int = 128,
    block_k: int = 128,
    swap: bool = True,
    programs: int = 528,
    scale_acc: bool | None = None,
) -> dict:
    """A configuration of ``mm``: tile sizes fitted to the layer (BLOCK_K divides the group,
    BLOCK_N divides N), split-K chosen so that about ``programs`` programs run."""
    block_m = max(16, min(128, triton.next_power_of_2(M)))
    while N % block_n:
        block_n //= 2
    while group % block_k or K % block_k:
        block_k //= 2
    tiles = triton.cdiv(M, block_m) * (N // block_n)
    n_split = max(1, min(K // block_k, programs // tiles))
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SWAP=swap,
        SCALE_ACC=block_m <= 32 if scale_acc is None else scale_acc,
        n_split=n_split,
        num_warps=4,
        num_stages=3,
    )


def _meta(bits: int, dtype: torch.dtype) -> dict:
    bf16 = dtype == torch.bfloat16
    return dict(BITS=bits, BF16=bf16, EMU=bf16 and interpreting())


def _check(
    dtype: torch.dtype, q: Tensor, sz: Tensor, K: int, group: int, block_n: int, block_k: int
) -> None:
    N = sz.shape[1]
    assert dtype in (torch.float16, torch.bfloat16)
    assert q.dtype == torch.int32 and q.is_contiguous() and q.shape[1] == N
    assert sz.dtype == torch.int32 and sz.is_contiguous() and N % block_n == 0
    assert K % group == 0 and group % block_k == 0


def mm(
    x: Tensor,
    q: Tensor,
    sz: Tensor,
    wst: Tensor | None,
    sidx: Tensor | None,
    bias: Tensor | None,
    ws: Tensor,
    cnt: Tensor,
    *,
    bits: int,
    group: int,
    config: dict | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """y [M, N] = x [M, K] @ dequant^T (+ salient) (+ bias) on tensor cores (see the kernel)."""
    M, K = x.shape
    N = sz.shape[1]
    cfg = config or mm_config(M, N, K, group)
    _check(x.dtype, q, sz, K, group, cfg["BLOCK_N"], cfg["BLOCK_K"])
    assert x.is_contiguous()
    nsal = 0 if sidx is None else sidx.numel()
    sal_k, direct = 64, cfg["n_split"] == 1
    n_sal_progs = 0 if direct else triton.cdiv(nsal, sal_k)
    grid = (N // cfg["BLOCK_N"], cfg["n_split"] + n_sal_progs, triton.cdiv(M, cfg["BLOCK_M"]))
    assert direct or (ws.numel() >= M * N and cnt.numel() >= grid[0] * grid[2])
    y = torch.empty(M, N, device=x.device, dtype=x.dtype) if out is None else out
    assert y.shape == (M, N) and y.dtype == x.dtype and y.is_contiguous()
    with on_device(x.device):
        _mm_kernel[grid](
            x,
            q,
            sz,
            wst if nsal else sz,
            sidx if nsal else sz,
            bias if bias is not None else sz,
            ws,
            cnt,
            y,
            M,
            N,
            K,
            nsal,
            cfg["n_split"],
            n_sal_progs,
            **_meta(bits, x.dtype),
            GROUP=group,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            SAL_K=sal_k,
            HAS_BIAS=bias is not None,
            DIRECT=direct,
            SWAP=cfg["SWAP"],
            SCALE_ACC=cfg["SCALE_ACC"],
            STAGES=cfg["num_stages"],
            SETTLE=not interpreting(),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return y


def backward(g: Tensor, q: Tensor, sz: Tensor, K: int, *, bits: int, group: int) -> Tensor:
    """grad_x [M, K] = g [M, N] @ dequant(W) (no salient part: ``base_matmul``'s backward)."""
    M, N = g.shape
    block_m, block_n = (16 if M <= 16 else 64), 64
    block_k = 64 if group % 64 == 0 else 32
    _check(g.dtype, q, sz, K, group, block_n, block_k)
    assert g.is_contiguous()
    gx = torch.empty(M, K, device=g.device, dtype=g.dtype)
    with on_device(g.device):
        _backward_kernel[(K // block_k, triton.cdiv(M, block_m))](
            g,
            q,
            sz,
            gx,
            M,
            N,
            K,
            **_meta(bits, g.dtype),
            GROUP=group,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            STAGES=2,
            SETTLE=not interpreting(),
            num_warps=4,
            num_stages=2,
        )
    return gx


NOISE_KINDS = {"none": 0, "normal": 1, "uniform": 2}


def dequantize(
    q: Tensor,
    sz: Tensor,
    wst: Tensor | None,
    sal_pos: Tensor | None,
    K: int,
    *,
    bits: int,
    group: int,
    dtype: torch.dtype,
    noise: str = "none",
    delta: Tensor | None = None,
    seed: int = 0,
) -> Tensor:
    """W^T [K, N] in ``dtype``, salient rows in place (``wst`` [k, N], ``sal_pos`` [K]); with
    ``noise`` (a key of NOISE_KINDS), per-column noise of scale ``delta`` [N] fp32 on the
    other rows, drawn from ``seed``."""
    N = sz.shape[1]
    block_n, block_k = (128 if N % 128 == 0 else 64), 64 if group % 64 == 0 else 32
    _check(dtype, q, sz, K, group, block_n, block_k)
    kind = NOISE_KINDS[noise]
    assert not kind or (delta is not None and delta.dtype == torch.float32 and delta.numel() == N)
    out = torch.empty(K, N, device=q.device, dtype=dtype)
    has_sal = wst is not None and wst.numel() > 0
    with on_device(q.device):
        _dequant_kernel[(K // block_k, N // block_n)](
            q,
            sz,
            wst if has_sal else sz,
            sal_pos if has_sal else sz,
            delta if kind else sz,
            out,
            N,
            K,
            seed,
            **_meta(bits, dtype),
            GROUP=group,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            HAS_SAL=has_sal,
            NOISE=kind,
            num_warps=4,
        )
    return out
