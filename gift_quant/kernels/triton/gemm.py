"""Batched path (M > 8): tensor-core split-K GEMM over the packed weights, its backward, and a
dequantizer for the dequantize-then-cuBLAS path (large M).

Each kernel gets ``code - zero`` tiles from ``triton_tiles.deq_tile`` and feeds them to
``tl.dot`` in the activation dtype. The forward multiplies each group's fp32 product by its
scale; the backward scales the activation-side operand instead (the scale varies along its
reduction). The salient columns are extra K-slices (x gathered by index times W_S^T), and
split-K partials go through the GEMV's self-cleaning workspace (``triton_gemv``).

Round 2's ``mm`` kernel (natural k order, no inline PTX) lives in ``triton_mm``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from gift_quant.kernels.triton.gemv import interpreting, on_device
from gift_quant.kernels.triton.ptx import deq_asm
from gift_quant.kernels.triton.tiles import deq_tile, step_permute

# ------------------------------------------------------------------------------------------
# 1. configuration (measured on the H200: docs/KERNELS-NOTES.md)


TARGET_PROGRAMS = 1024  # four-warp programs per launch


def gemm_config(M: int, N: int, K: int, bits: int, group: int) -> dict:
    """BLOCK_M <= 64 and 4 warps: the tile layouts checked on the H200 (check_kernels)."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 128 if N % 128 == 0 else 64
    block_k = 128 if group % 128 == 0 and K % 128 == 0 else 64 if group % 64 == 0 else 32
    tiles = triton.cdiv(M, block_m) * (N // block_n)
    n_split = max(1, min(K // block_k, TARGET_PROGRAMS // tiles))
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        n_split=n_split,
        num_warps=4,
        num_stages=3,
    )


# ------------------------------------------------------------------------------------------
# 2. kernels


@triton.jit
def _salient_dot(acc, x_ptr, wst_ptr, sidx_ptr, offs_m, mmask, offs_n, N, K, j0, j_end):
    """acc += x[:, S[j0:j_end]] @ W_S^T[j0:j_end, :] in the activation dtype, fp32 accumulate."""
    for jj in range(j0, j_end, 32):
        offs_j = jj + tl.arange(0, 32)
        jmask = offs_j < j_end
        sid = tl.load(sidx_ptr + offs_j, mask=jmask, other=0)
        a = tl.load(
            x_ptr + offs_m[:, None] * K + sid[None, :],
            mask=mmask[:, None] & jmask[None, :],
            other=0.0,
        )
        w = tl.load(wst_ptr + offs_j[:, None] * N + offs_n[None, :], mask=jmask[:, None], other=0.0)
        acc = tl.dot(a, w.to(x_ptr.dtype.element_ty), acc)
    return acc


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(
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
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SAL_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DIRECT: tl.constexpr,
    STAGES: tl.constexpr,
    USE_ASM: tl.constexpr,
    ASM: tl.constexpr,
    CONSTR: tl.constexpr,
):
    """x [M, K]; q, sz, wst, sidx, ws, cnt as in the GEMV; y [M, N]. Grid (N / BLOCK_N,
    N_SPLIT + N_SAL_PROGS, cdiv(M, BLOCK_M)). DIRECT: one program per tile (it also does the
    salient columns), plain stores, no workspace."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if pid_k < N_SPLIT:
        n_kb = K // BLOCK_K
        for j in tl.range(
            pid_k * n_kb // N_SPLIT, (pid_k + 1) * n_kb // N_SPLIT, num_stages=STAGES
        ):
            kb = j * BLOCK_K
            offs_k = kb + tl.arange(0, BLOCK_K)
            a = tl.load(
                x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mmask[:, None], other=0.0
            )
            w, scale = deq_tile(
                q_ptr,
                sz_ptr,
                kb,
                offs_n,
                N,
                BITS,
                BF16,
                GROUP,
                BLOCK_K,
                BLOCK_N,
                USE_ASM,
                ASM,
                CONSTR,
            )
            a = step_permute(a, BITS, BLOCK_M, BLOCK_K, USE_ASM)
            if BLOCK_M > 32:  # scaling the [BLOCK_K, BLOCK_N] tile is cheaper than the acc
                acc = tl.dot(a, (w.to(tl.float32) * scale[None, :]).to(w.dtype), acc)
            else:
                acc += tl.dot(a, w) * scale[None, :]
    if DIRECT:
        acc = _salient_dot(acc, x_ptr, wst_ptr, sidx_ptr, offs_m, mmask, offs_n, N, K, 0, NSAL)
    elif pid_k >= N_SPLIT:
        j0 = (pid_k - N_SPLIT) * SAL_K
        acc = _salient_dot(
            acc,
            x_ptr,
            wst_ptr,
            sidx_ptr,
            offs_m,
            mmask,
            offs_n,
            N,
            K,
            j0,
            tl.minimum(NSAL, j0 + SAL_K),
        )
    omask = mmask[:, None] & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:  # the GEMV's protocol; one counter per (pid_m, pid_n) tile
        tile = pid_m * tl.num_programs(0) + pid_n
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=omask, sem="relaxed")
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if done == N_SPLIT + N_SAL_PROGS - 1:
            out = tl.load(ws_ptrs, mask=omask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                out += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
            tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=omask)
            tl.store(ws_ptrs, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), mask=omask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")


@triton.jit(do_not_specialize=["M"])
def _gemm_bwd_kernel(
    # pointers
    g_ptr,
    q_ptr,
    sz_ptr,
    gx_ptr,
    # sizes
    M,
    N,
    K,
    # meta
    BITS: tl.constexpr,
    BF16: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    USE_ASM: tl.constexpr,
    ASM: tl.constexpr,
    CONSTR: tl.constexpr,
):
    """gx [M, K] = g [M, N] @ dequant(W) [N, K] (no salient part). Grid (K / BLOCK_K,
    cdiv(M, BLOCK_M)); every program loops over all of N."""
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    kb = pid_k * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for nb in tl.range(0, N, BLOCK_N, num_stages=STAGES):
        offs_n = nb + tl.arange(0, BLOCK_N)
        w, scale = deq_tile(
            q_ptr, sz_ptr, kb, offs_n, N, BITS, BF16, GROUP, BLOCK_K, BLOCK_N, USE_ASM, ASM, CONSTR
        )
        g = tl.load(g_ptr + offs_m[:, None] * N + offs_n[None, :], mask=mmask[:, None], other=0.0)
        g = (g.to(tl.float32) * scale[None, :]).to(g_ptr.dtype.element_ty)
        acc = tl.dot(g, tl.trans(w), acc)
    # acc's columns are in deq_tile's row order: store through the same permutation of k
    offs_k = step_permute(kb + tl.arange(0, BLOCK_K)[None, :], BITS, 1, BLOCK_K, USE_ASM)
    tl.store(
        gx_ptr + offs_m[:, None] * K + offs_k, acc.to(gx_ptr.dtype.element_ty), mask=mmask[:, None]
    )


@triton.jit
def _dequant_kernel(
    q_ptr,
    sz_ptr,
    wst_ptr,
    sal_pos_ptr,
    out_ptr,
    N,
    K,
    BITS: tl.constexpr,
    BF16: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_SAL: tl.constexpr,
    USE_ASM: tl.constexpr,
    ASM: tl.constexpr,
    CONSTR: tl.constexpr,
):
    """out [K, N] = dequant(W)^T, rows with sal_pos[k] >= 0 replaced by W_S^T[sal_pos[k]]."""
    kb = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w, scale = deq_tile(
        q_ptr, sz_ptr, kb, offs_n, N, BITS, BF16, GROUP, BLOCK_K, BLOCK_N, USE_ASM, ASM, CONSTR
    )
    out = w.to(tl.float32) * scale[None, :]
    offs_k = step_permute(kb + tl.arange(0, BLOCK_K)[None, :], BITS, 1, BLOCK_K, USE_ASM)
    offs_k = tl.reshape(offs_k, [BLOCK_K])
    if HAS_SAL:
        pos = tl.load(sal_pos_ptr + offs_k)
        sal = tl.load(
            wst_ptr + tl.maximum(pos, 0)[:, None] * N + offs_n[None, :],
            mask=(pos >= 0)[:, None],
            other=0.0,
        )
        out = tl.where((pos >= 0)[:, None], sal.to(tl.float32), out)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------
# 3. launchers


def _meta(bits: int, dtype: torch.dtype) -> dict:
    bf16 = dtype == torch.bfloat16
    asm, constr, _ = deq_asm(bits, "bf16" if bf16 else "f16")
    return dict(BITS=bits, BF16=bf16, USE_ASM=not interpreting(), ASM=asm, CONSTR=constr)


def _check(
    dtype: torch.dtype, q: Tensor, sz: Tensor, K: int, group: int, block_n: int, block_k: int
) -> None:
    N = sz.shape[1]
    assert dtype in (torch.float16, torch.bfloat16)
    assert q.dtype == torch.int32 and q.is_contiguous() and q.shape[1] == N
    assert sz.dtype == torch.int32 and sz.is_contiguous() and N % block_n == 0
    assert K % group == 0 and group % block_k == 0


def gemm(
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
    """y [M, N] = x [M, K] @ dequant^T (+ salient) (+ bias) on tensor cores."""
    M, K = x.shape
    N = sz.shape[1]
    cfg = config or gemm_config(M, N, K, bits, group)
    assert cfg["BLOCK_M"] <= 64 and cfg["num_warps"] == 4, "tile layout not validated"
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
        _gemm_kernel[grid](
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
            GROUP=group,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            SAL_K=sal_k,
            HAS_BIAS=bias is not None,
            DIRECT=direct,
            STAGES=cfg["num_stages"],
            **_meta(bits, x.dtype),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return y


def gemm_backward(g: Tensor, q: Tensor, sz: Tensor, K: int, *, bits: int, group: int) -> Tensor:
    """grad_x [M, K] = g [M, N] @ dequant(W) (no salient part: ``base_matmul``'s backward)."""
    M, N = g.shape
    block_m, block_n = (16 if M <= 16 else 64), 64
    block_k = 64 if group % 64 == 0 else 32
    _check(g.dtype, q, sz, K, group, block_n, block_k)
    assert g.is_contiguous()
    gx = torch.empty(M, K, device=g.device, dtype=g.dtype)
    with on_device(g.device):
        _gemm_bwd_kernel[(K // block_k, triton.cdiv(M, block_m))](
            g,
            q,
            sz,
            gx,
            M,
            N,
            K,
            GROUP=group,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            STAGES=2,
            **_meta(bits, g.dtype),
            num_warps=4,
            num_stages=2,
        )
    return gx


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
) -> Tensor:
    """W^T [K, N] in ``dtype``, salient rows in place (``wst`` [k, N], ``sal_pos`` [K])."""
    N = sz.shape[1]
    block_n, block_k = (128 if N % 128 == 0 else 64), 64 if group % 64 == 0 else 32
    _check(dtype, q, sz, K, group, block_n, block_k)
    out = torch.empty(K, N, device=q.device, dtype=dtype)
    has_sal = wst is not None and wst.numel() > 0
    with on_device(q.device):
        _dequant_kernel[(K // block_k, N // block_n)](
            q,
            sz,
            wst if has_sal else sz,
            sal_pos if has_sal else sz,
            out,
            N,
            K,
            GROUP=group,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            HAS_SAL=has_sal,
            **_meta(bits, dtype),
            num_warps=4,
        )
    return out
