"""Decode-path split-K GEMV (M <= 8): y = x @ dequant(W)^T + x[:, S] @ W_S^T (+ bias).

One launch does everything: programs ``pid_k < n_split`` stream an even
share of the packed weights (as stored for 2/4 bits, the 3-word units of ``triton_ptx`` for 3
bits), dequantize with inline PTX (one lop3 + one fma per two weights) and dot with packed x
pairs in f16x2/bf16x2 (under the Triton interpreter, which has no PTX: the same codes read with
plain shifts and an fp32 dot); the remaining programs are the salient K-slices (x gathered by index,
fp32 dot with W_S^T). Each program adds its fp32 partial into a zeroed workspace with relaxed
atomics; the last program of a column block (a counter, acq_rel) adds the bias, casts, writes
y, and zeroes the workspace and the counter again (``tiles.store_output``), so nothing else is
launched.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from gift_quant.kernels.cuda.rules import dependent_launch
from gift_quant.kernels.triton.ptx import deqdot_asm, plan
from gift_quant.kernels.triton.tiles import interpreting, on_device, register_cap, store_output

# ------------------------------------------------------------------------------------------
# 1. configuration (measured on the H200: docs/KERNELS-NOTES.md)

MAX_M = 8
TARGET_PROGRAMS = 1536  # one-warp programs per launch (about 12 per SM)
K_PER_PROGRAM = 320  # at most about this many input columns per program
# At M = 1 the kernel takes 96 registers: 21 one-warp programs fit per SM; capped at 80
# registers (a 32-40 byte spill), 25. Capping pays where the uncapped launch runs well past one
# wave of 21 per SM. Measured at M = 1 with 128 salient columns (programs: K splits and salient
# programs per column block), the cap against none: 24576 and 25600 x 4096 (2,880 and 3,000
# programs) -5 to -6% at every bit width, 26624 and 27648 x 4096 (3,120 and 3,240) +9 to +13%
# (kernels_h200_gemv_sweep_m1_r13.json.gz); 28672 x 4096 (3,360) +14-17%, 8192 x 28672 (5,888)
# +2-3%, the shapes of at most 1,944 programs up to -9% (kernels_h200_gemv_sweep_maxnreg.json.gz,
# _wave.json), and a 7B decode's fused gate/up 22016 x 4096 with 246-255 salient columns
# (2,924) cost batch-1 decode 1.6% (decode_h200_graphs_11ac32f_gateup_capped.json). So the cap
# is taken above 23 programs per SM, between the losses (at most 22.7) and the gains (at least
# 23.6).
PROGRAMS_PER_SM, CAP_ABOVE_PROGRAMS_PER_SM, WIDE_MAXNREG = 21, 23, 80
SAL_PER_PROG, SAL_CHUNK = 64, 32


def _fit(block_k: int, K: int, group: int) -> int:
    while group % block_k or K % block_k:
        block_k //= 2
    return block_k


def imbalance(n_kb: int, n_split: int) -> float:
    """The longest split's k-blocks over the mean (1.0: every split does the same work)."""
    return triton.cdiv(n_kb, n_split) * n_split / n_kb


def _block_n(N: int) -> int:
    return 128 if N % 128 == 0 else 64 if N % 64 == 0 else 32


def split_target(N: int, K: int) -> int:
    """The split count the rule aims at: TARGET_PROGRAMS over the column blocks, at most
    K_PER_PROGRAM input columns per program."""
    return max(
        triton.cdiv(TARGET_PROGRAMS, triton.cdiv(N, _block_n(N))), triton.cdiv(K, K_PER_PROGRAM)
    )


def gemv_config(
    M: int, N: int, K: int, bits: int, group: int, nsal: int = 0, sms: int = 132
) -> dict:
    """Tile and split for one call; BLOCK_K shrinks with M to bound the x-pair registers. At
    M = 1 BLOCK_K is 128 or 64, whichever shares the k-blocks more evenly over the splits (128
    on a tie): on the H200 an uneven share cost more than the smaller tile (5120^2 W4: 39
    splits of 40 blocks of 128, one split doing two, 10.15 us; of 80 blocks of 64, 8.86 us;
    kernels_h200_gemv_sweep_bk.json.gz). At M = 1, a launch of more programs (``nsal`` salient
    columns included) than CAP_ABOVE_PROGRAMS_PER_SM per SM on ``sms`` SMs caps its registers."""
    block_m = triton.next_power_of_2(M)
    want = split_target(N, K)
    tiles = [128, 64] if block_m == 1 else [{2: 64}.get(block_m, 32)]
    block_k = min(
        (_fit(bk, K, group) for bk in tiles),
        key=lambda bk: (imbalance(K // bk, min(K // bk, want)), -bk),
    )
    return split_config(M, N, nsal, sms, block_k, min(K // block_k, want))


# Measured at first use beside the rule for M <= TUNED_M rows (``routes.tuning_names``): for
# each k-tile the layer allows (128, 64 and 32 deep at one row, 64 and 32 at two), the split
# counts nearest below and above the rule's target and half of it that deal the k-blocks within
# EVEN_SHARE of evenly (the kernel gives each split floor or ceil of the mean, so the launch
# waits for the longest). On an H100 (bench_gemv_splits.py over twelve shapes, 2/3/4 bits, 0
# and 128 salient columns, M = 1 and 2; gemv_splits_h100_62f7110.json.gz) the fastest of these
# and the rule took 0.918x the rule's time in geometric mean over 144 cells (the whole grid's
# fastest 0.894x), while no fixed rule of this kind (one tile order, one target) beat the rule
# itself: the best tile and count differ by shape, width and salient columns, so they are timed.
TUNED_M, EVEN_SHARE = 2, 1.03
TUNED_TILES = {1: (128, 64, 32), 2: (64, 32)}  # k-tiles per row count (rows: x registers)


def gemv_names(M: int, N: int, K: int, group: int) -> list[str]:
    """The GEMV's configurations timed beside its rule ("gemv") for M rows of an (N, K) layer
    with quantization groups of ``group``: "gemv:BKxS" (k-tile BK, S splits; see TUNED_M)."""
    if M > TUNED_M:
        return []
    rule = gemv_config(M, N, K, 4, group)
    want = split_target(N, K)
    out: list[tuple[int, int]] = []
    for bk in TUNED_TILES[M]:
        if group % bk or K % bk:
            continue
        n_kb = K // bk
        even = [s for s in range(1, n_kb + 1) if imbalance(n_kb, s) <= EVEN_SHARE]
        for target in (want, want / 2):
            below = [s for s in even if s <= target]
            above = [s for s in even if s >= target]
            for s in ([max(below)] if below else []) + ([min(above)] if above else []):
                if (bk, s) not in out and (bk, s) != (rule["BLOCK_K"], rule["n_split"]):
                    out.append((bk, s))
    return [f"gemv:{bk}x{s}" for bk, s in out]


def named_split(name: str) -> tuple[int, int]:
    """(k-tile, splits) of a "gemv:BKxS" name (``gemv``'s ``split``)."""
    bk, s = (int(v) for v in name.removeprefix("gemv:").split("x"))
    return bk, s


def split_config(M: int, N: int, nsal: int, sms: int, block_k: int, n_split: int) -> dict:
    """The configuration with this k-tile and split count, the rest as the rule sets it (the
    column tile from N, one warp, one stage, the register cap above CAP_ABOVE_PROGRAMS_PER_SM
    programs per SM at M = 1)."""
    block_m, block_n = triton.next_power_of_2(M), _block_n(N)
    programs = triton.cdiv(N, block_n) * (n_split + triton.cdiv(nsal, SAL_PER_PROG))
    cap = block_m == 1 and programs > CAP_ABOVE_PROGRAMS_PER_SM * sms
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        n_split=n_split,
        num_warps=1,
        num_stages=1,
        **({"maxnreg": WIDE_MAXNREG} if cap else {}),
    )


def dependent_wait(cfg: dict, N: int, K: int, nsal: int, sms: int) -> str | None:
    """Where a launch in configuration ``cfg`` on an (N, K) layer with ``nsal`` salient columns
    waits for the previous kernel as a programmatic dependent (where the device allows it,
    ``rules.dependent_launch``) on a GPU of ``sms`` SMs: "loop" (in the first k-block, after
    its weight loads), "before" (before the k-loop), or None (an ordinary launch)."""
    # Measured on the H200 at M = 1 in one run, rules-only, against ordinary launches
    # (benchmarks/results/gemv_wait_ab_05cc2b1.txt): within one wave (21 programs per SM) the wait
    # in the loop was faster than the wait before it on 16 of the 18 cells of six shapes (by 0.3-9%;
    # 4096^2 W4 6.08 against 6.26 us, ordinary 6.88; 12288 x 4096 W3 and W4 the other way, by 7% and
    # 4%), though it holds the first weights across the wait (W4 with 128-deep k-blocks: 168
    # registers instead of 96, W3 128); past one wave, where it had taken 32-36% longer at W4
    # (kernels_h200_pdl_on_60614d2.json.gz), the wait before the loop (96 registers, capped 80) beat
    # ordinary launches on both shapes at every width (28672 x 4096 W4 21.02 -> 20.23 us, 8192 x
    # 28672 W4 40.05 -> 38.64). The wait in the loop needs one pipeline stage (Triton issues the x
    # loads of later stages ahead of it) and a k-block for every program (an empty k-range would
    # skip it); the wait before the loop needs neither. M > 1 past one wave was not measured:
    # ordinary launches.
    programs = triton.cdiv(N, cfg["BLOCK_N"]) * (cfg["n_split"] + triton.cdiv(nsal, SAL_PER_PROG))
    if programs <= PROGRAMS_PER_SM * sms:
        loop_ok = cfg["num_stages"] == 1 and cfg["n_split"] <= K // cfg["BLOCK_K"]
        return "loop" if loop_ok else "before"
    return "before" if cfg["BLOCK_M"] == 1 else None


# ------------------------------------------------------------------------------------------
# 2. kernel


@triton.jit
def _xpairs(x32_ptr, xbase, rmask, BITS: tl.constexpr, NSTEPS: tl.constexpr, EVEN_M: tl.constexpr):
    """Packed x pairs (x[lo_k], x[hi_k]) of every plan step for one row: NSTEPS x [RU, 1]."""
    DK: tl.constexpr = 4 if BITS == 4 else (8 if BITS == 2 else 1)
    out = ()
    for i in tl.static_range(NSTEPS):
        # input column (inside the unit) of the lo half of step i; the hi half is lo_k + DK
        lo_k = (8 * (i // 4) + i % 4) if BITS == 4 else (i if BITS == 2 else 2 * i)
        if EVEN_M:
            a = tl.load(x32_ptr + xbase + lo_k // 2)
            b = tl.load(x32_ptr + xbase + (lo_k + DK) // 2)
        else:
            a = tl.load(x32_ptr + xbase + lo_k // 2, mask=rmask, other=0)
            b = tl.load(x32_ptr + xbase + (lo_k + DK) // 2, mask=rmask, other=0)
        if DK == 1:  # the pair is one int32 word of x as is
            v = a
        else:
            lo = (a & 0xFFFF) if lo_k % 2 == 0 else ((a >> 16) & 0xFFFF)
            hi = (b << 16) if (lo_k + DK) % 2 == 0 else (b & -65536)
            v = lo | hi
        out = out + (v[:, None],)
    return out


@triton.jit
def _half(v, lo: tl.constexpr, BF16: tl.constexpr):
    """fp32 value of the low/high half of packed pairs (interpreter path only)."""
    h = (v & 0xFFFF) if lo else ((v >> 16) & 0xFFFF)
    if BF16:
        return (h << 16).to(tl.float32, bitcast=True)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _code(words, i: tl.constexpr, hi: tl.constexpr, BITS: tl.constexpr):
    """Code of step i's lo/hi half, read with plain shifts (interpreter path only)."""
    if BITS == 3:
        if i == 15:
            s0: tl.constexpr = 15 + 16 * hi
            c = ((words[0] >> s0) & 1) | ((words[1] >> (s0 - 1)) & 2)
            c = c | ((words[2] >> (s0 - 2)) & 4)
        else:
            c = (words[i // 5] >> (3 * (i % 5) + 16 * hi)) & 7
    elif BITS == 4:
        c = (words[i // 4] >> (4 * (i % 4) + 16 * hi)) & 15
    else:
        c = (words[0] >> (2 * i + 16 * hi)) & 3
    return c


@triton.jit
def _unit_dot(
    words,
    z,
    xp,
    BITS: tl.constexpr,
    BF16: tl.constexpr,
    NSTEPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    USE_ASM: tl.constexpr,
    ASM: tl.constexpr,
    CONSTR: tl.constexpr,
):
    """Per row m: sum over the unit of (code - z) * x, as BLOCK_M [RU, BLOCK_N] fp32."""
    if USE_ASM:
        MANT: tl.constexpr = 7 if BF16 else 10
        EXP: tl.constexpr = 134 if BF16 else 25
        NPOS: tl.constexpr = (MANT - BITS) // BITS + 1
        consts = ()
        for i in tl.static_range(NPOS):  # -(2**(MANT - p) + z) in both halves, p = i * BITS
            c = ((z << (i * BITS)) + (0x8000 | ((EXP - i * BITS) << MANT))) * 65537
            consts = consts + (c[None, :],)
        return tl.inline_asm_elementwise(
            ASM, CONSTR, words + consts + xp, dtype=(tl.float32,) * BLOCK_M, is_pure=True, pack=1
        )
    zf = z.to(tl.float32)[None, :]
    out = ()
    for m in tl.static_range(BLOCK_M):
        d = tl.zeros(words[0].shape, tl.float32)
        for i in tl.static_range(NSTEPS):
            xv = xp[m * NSTEPS + i]
            lo = _code(words, i, 0, BITS).to(tl.float32) - zf
            hi = _code(words, i, 1, BITS).to(tl.float32) - zf
            d += lo * _half(xv, True, BF16) + hi * _half(xv, False, BF16)
        out = out + (d,)
    return out


@triton.jit
def _gemv_kernel(
    # pointers
    x_ptr,
    x32_ptr,
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
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAL_PER_PROG: tl.constexpr,
    SAL_CHUNK: tl.constexpr,
    STAGES: tl.constexpr,
    USE_ASM: tl.constexpr,
    ASM: tl.constexpr,
    CONSTR: tl.constexpr,
    PDL: tl.constexpr,
    WAIT_IN_LOOP: tl.constexpr,
):
    """x [M, K] f16/bf16 (x32: its int32 view [M, K/2]); q [K/UNIT_K*UNIT_W, N] int32;
    sz [G, N] int32 = fp16 scale bits | zero << 16; wst [NSAL, N] fp16; sidx [NSAL] int32;
    bias [N]; ws [M, N] fp32 zeros; cnt [cdiv(N, BLOCK_N)] int32 zeros; y [M, N] like x.
    PDL (a programmatic dependent launch, ``rules.dependent_launch``; ``dependent_wait`` says
    where): each program waits for the previous kernel (``gdc_wait``) before it reads x and
    the workspace, in its first k-block after that block's weight loads (WAIT_IN_LOOP) or
    before its k-loop; the next kernel may launch once every program has reached its
    epilogue (a trigger at the start let the next kernel's programs take places while this
    one still streamed its weights, and cost up to 23% on the largest layers)."""
    UNIT_W: tl.constexpr = 3 if BITS == 3 else (2 if BITS == 4 else 1)
    UNIT_K: tl.constexpr = 32 if BITS == 3 else 16
    NSTEPS: tl.constexpr = 16 if BITS == 3 else 8
    RU: tl.constexpr = BLOCK_K // UNIT_K
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if PDL and not WAIT_IN_LOOP:
        gdc_wait()  # x and the workspace come after the previous kernel
    if pid_k < N_SPLIT:
        n_kb = K // BLOCK_K
        for j in tl.range(
            pid_k * n_kb // N_SPLIT, (pid_k + 1) * n_kb // N_SPLIT, num_stages=STAGES
        ):
            kb = j * BLOCK_K
            units = kb // UNIT_K + tl.arange(0, RU)
            words = ()
            for t in tl.static_range(UNIT_W):
                ptrs = q_ptr + (units * UNIT_W + t)[:, None] * N + offs_n[None, :]
                if EVEN_N:
                    w = tl.load(ptrs, eviction_policy="evict_first")
                else:
                    w = tl.load(ptrs, mask=nmask[None, :], other=0, eviction_policy="evict_first")
                words = words + (w,)
            if EVEN_N:
                sz = tl.load(sz_ptr + (kb // GROUP) * N + offs_n)
            else:
                sz = tl.load(sz_ptr + (kb // GROUP) * N + offs_n, mask=nmask, other=0)
            scale = (sz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            if PDL and WAIT_IN_LOOP:
                gdc_wait()  # x comes from the previous kernel
            ubase = kb // 2 + tl.arange(0, RU) * (UNIT_K // 2)
            xp = ()
            for m in tl.static_range(BLOCK_M):
                xp = xp + _xpairs(x32_ptr, m * (K // 2) + ubase, m < M, BITS, NSTEPS, EVEN_M)
            d = _unit_dot(
                words, (sz >> 16) & 0xFFFF, xp, BITS, BF16, NSTEPS, BLOCK_M, USE_ASM, ASM, CONSTR
            )
            for m in tl.static_range(BLOCK_M):
                part = scale * tl.sum(d[m], axis=0)
                acc += tl.where(offs_m[:, None] == m, part[None, :], 0.0)
    else:
        j0 = (pid_k - N_SPLIT) * SAL_PER_PROG
        for jj in tl.static_range(0, SAL_PER_PROG, SAL_CHUNK):
            offs_j = j0 + jj + tl.arange(0, SAL_CHUNK)
            jmask = offs_j < NSAL
            sid = tl.load(sidx_ptr + offs_j, mask=jmask, other=0)
            w = tl.load(
                wst_ptr + offs_j[:, None] * N + offs_n[None, :],
                mask=jmask[:, None] & nmask[None, :],
                other=0.0,
            ).to(tl.float32)
            if PDL and WAIT_IN_LOOP:
                gdc_wait()
            for m in tl.static_range(BLOCK_M):
                xs = tl.load(x_ptr + m * K + sid, mask=jmask & (m < M), other=0.0)
                part = tl.sum(xs.to(tl.float32)[:, None] * w, axis=0)
                acc += tl.where(offs_m[:, None] == m, part[None, :], 0.0)
    if PDL:
        gdc_launch_dependents()
    omask = (offs_m[:, None] < M) & nmask[None, :]
    yoff = offs_m[:, None] * N + offs_n[None, :]
    n_parts = N_SPLIT + N_SAL_PROGS
    store_output(
        acc,
        yoff,
        omask,
        offs_n[None, :],
        nmask[None, :],
        y_ptr,
        bias_ptr,
        ws_ptr,
        cnt_ptr,
        pid_n,
        n_parts,
        HAS_BIAS,
        False,
        BF16,
        EMU,
    )


# ------------------------------------------------------------------------------------------
# 3. launcher


@functools.cache
def _sms(device: torch.device) -> int:
    """The SM count of a CUDA device (the H200's 132 elsewhere: the interpreter)."""
    return (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 132
    )


def gemv(
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
    split: tuple[int, int] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """y [M, N] = x [M, K] @ dequant^T (+ salient) (+ bias); M <= MAX_M; see the kernel."""
    M, K = x.shape
    N = sz.shape[1]
    assert 1 <= M <= MAX_M and x.is_contiguous() and x.dtype in (torch.float16, torch.bfloat16)
    assert q.dtype == torch.int32 and q.is_contiguous() and q.shape[1] == N
    assert sz.dtype == torch.int32 and sz.is_contiguous() and K % group == 0
    nsal = 0 if sidx is None else sidx.numel()
    if config is None and split is not None:  # a k-tile and split count, the rest by the rule
        config = split_config(M, N, nsal, _sms(x.device), *split)
    cfg = config or gemv_config(M, N, K, bits, group, nsal, _sms(x.device))
    assert K % cfg["BLOCK_K"] == 0 and group % cfg["BLOCK_K"] == 0
    n_sal_progs = triton.cdiv(nsal, SAL_PER_PROG)
    n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    assert ws.numel() >= M * N and cnt.numel() >= n_blocks
    bf16 = x.dtype == torch.bfloat16
    kind = "bf16" if bf16 else "f16"
    asm, constr = deqdot_asm(bits, kind, cfg["BLOCK_M"])
    assert len(plan(bits, kind).positions) == (7 - bits if bf16 else 10 - bits) // bits + 1
    y = torch.empty(M, N, device=x.device, dtype=x.dtype) if out is None else out
    assert y.shape == (M, N) and y.dtype == x.dtype and y.is_contiguous()
    grid = (n_blocks, cfg["n_split"] + n_sal_progs)
    wait = None
    if not interpreting() and dependent_launch(x.device):
        wait = dependent_wait(cfg, N, K, nsal, _sms(x.device))
    with on_device(x.device):
        _gemv_kernel[grid](
            x,
            x.view(torch.int32),
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
            BITS=bits,
            BF16=bf16,
            EMU=bf16 and interpreting(),
            GROUP=group,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            EVEN_M=M == cfg["BLOCK_M"],
            EVEN_N=N % cfg["BLOCK_N"] == 0,
            HAS_BIAS=bias is not None,
            SAL_PER_PROG=SAL_PER_PROG,
            SAL_CHUNK=SAL_CHUNK,
            STAGES=cfg["num_stages"],
            USE_ASM=not interpreting(),
            ASM=asm,
            CONSTR=constr,
            PDL=wait is not None,
            WAIT_IN_LOOP=wait == "loop",
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
            **register_cap(cfg),
            **({"launch_pdl": True} if wait is not None else {}),
        )
    return y
