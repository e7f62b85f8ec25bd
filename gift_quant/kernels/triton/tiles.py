"""Dequantized weight tiles for the tensor-core kernels (``triton_gemm``).

``deq_tile`` returns ``code - zero`` of a [BLOCK_K, BLOCK_N] block in the activation dtype
plus the fp32 scales of its group. With inline PTX (``triton_ptx.deq_asm``, the GPU path)
the words are loaded once as coalesced 16-byte vectors and unpacked two codes per lop3/fma;
the rows come out in the plan's *step order* inside every unit (the halves of one f16x2 pair
adjacent), and the caller permutes the other operand the same way with ``step_permute``.
Without PTX (the Triton interpreter: CPU tests) ``deq_tile`` unpacks element by element in
natural order and ``step_permute`` is the identity.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _zero_consts(z, BITS: tl.constexpr, BF16: tl.constexpr):
    """-(2**(MANT - p) + z) in both halves of an int32, one per bit position p = i * BITS."""
    MANT: tl.constexpr = 7 if BF16 else 10
    EXP: tl.constexpr = 134 if BF16 else 25
    NPOS: tl.constexpr = (MANT - BITS) // BITS + 1
    out = ()
    for i in tl.static_range(NPOS):
        out = out + ((((z << (i * BITS)) + (0x8000 | ((EXP - i * BITS) << MANT))) * 65537),)
    return out


@triton.jit
def _deq_tile_asm(
    q_ptr,
    sz,
    kb,
    offs_n,
    N,
    BITS: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ASM: tl.constexpr,
    CONSTR: tl.constexpr,
):
    UNIT_W: tl.constexpr = 3 if BITS == 3 else (2 if BITS == 4 else 1)
    UNIT_K: tl.constexpr = 32 if BITS == 3 else 16
    RU: tl.constexpr = BLOCK_K // UNIT_K
    units = kb // UNIT_K + tl.arange(0, RU)
    args = ()
    for t in tl.static_range(UNIT_W):
        ptrs = q_ptr + (units * UNIT_W + t)[:, None] * N + offs_n[None, :]
        args = args + (tl.load(ptrs, eviction_policy="evict_first"),)
    consts = _zero_consts((sz >> 16) & 0xFFFF, BITS, BF16)
    for i in tl.static_range(len(consts)):
        args = args + (consts[i][None, :],)
    ty = tl.bfloat16 if BF16 else tl.float16
    # one 16-bit output per code: layout-independent (each element is its own scalar)
    lvl = tl.inline_asm_elementwise(ASM, CONSTR, args, dtype=(ty,) * UNIT_K, is_pure=True, pack=1)
    for _ in tl.static_range(5 if BITS == 3 else 4):  # [RU, BN, bit 0 of o, bit 1, ...]
        nxt = ()
        for i in tl.static_range(len(lvl) // 2):
            nxt = nxt + (tl.join(lvl[2 * i], lvl[2 * i + 1]),)
        lvl = nxt
    if BITS == 3:  # reverse the bit dims: position o = 2 * step + half (step order)
        tile = tl.permute(lvl[0], (0, 1, 6, 5, 4, 3, 2))
    else:
        tile = tl.permute(lvl[0], (0, 1, 5, 4, 3, 2))
    tile = tl.reshape(tile, [RU, BLOCK_N, UNIT_K])
    return tl.reshape(tl.permute(tile, (0, 2, 1)), [BLOCK_K, BLOCK_N])


@triton.jit
def _deq_tile_ew(
    q_ptr, sz, kb, offs_n, N, BITS: tl.constexpr, BF16: tl.constexpr, BLOCK_K: tl.constexpr
):
    offs_k = kb + tl.arange(0, BLOCK_K)
    z = (sz >> 16) & 0xFFFF
    if BITS == 3:  # the 3-word unit layout of triton_ptx.pack_3bit
        c = (offs_k // 32) * 3
        r = offs_k % 32
        t = tl.minimum(r // 10, 2)
        w = tl.load(q_ptr + (c + t)[:, None] * N + offs_n[None, :])
        code = (w >> (3 * ((r % 10) // 2) + 16 * (r % 2))[:, None]) & 7
        w0 = tl.load(q_ptr + c[:, None] * N + offs_n[None, :])
        w1 = tl.load(q_ptr + (c + 1)[:, None] * N + offs_n[None, :])
        sp = (15 + 16 * (r % 2))[:, None]
        spill = ((w0 >> sp) & 1) | ((w1 >> (sp - 1)) & 2) | ((w >> (sp - 2)) & 4)
        code = tl.where((r >= 30)[:, None], spill, code)
    else:
        EPW: tl.constexpr = 32 // BITS
        w = tl.load(q_ptr + (offs_k // EPW)[:, None] * N + offs_n[None, :])
        code = (w >> ((offs_k % EPW) * BITS)[:, None]) & ((1 << BITS) - 1)
    v = (code - z[None, :]).to(tl.float32)
    return v.to(tl.bfloat16 if BF16 else tl.float16)


@triton.jit
def deq_tile(
    q_ptr,
    sz_ptr,
    kb,
    offs_n,
    N,
    BITS: tl.constexpr,
    BF16: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_ASM: tl.constexpr,
    ASM: tl.constexpr,
    CONSTR: tl.constexpr,
):
    """(code - zero) of rows kb..kb+BLOCK_K (step order inside each unit when USE_ASM) as
    [BLOCK_K, BLOCK_N] f16/bf16, and the fp32 scales [BLOCK_N] of their group. q as in
    triton_gemv; N must be a multiple of BLOCK_N and BLOCK_K must divide GROUP."""
    sz = tl.load(sz_ptr + (kb // GROUP) * N + offs_n)
    if USE_ASM:
        tile = _deq_tile_asm(q_ptr, sz, kb, offs_n, N, BITS, BF16, BLOCK_K, BLOCK_N, ASM, CONSTR)
    else:
        tile = _deq_tile_ew(q_ptr, sz, kb, offs_n, N, BITS, BF16, BLOCK_K)
    scale = (sz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return tile, scale


@triton.jit
def step_permute(
    a, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr
):
    """Columns of a [BLOCK_M, BLOCK_K] in the order of deq_tile's rows (step order)."""
    if USE_ASM:
        if BITS == 4:  # k = 8t + 4h + i  ->  p = 8t + 2i + h
            a = tl.reshape(a, [BLOCK_M, BLOCK_K // 16, 2, 2, 4])
            a = tl.reshape(tl.permute(a, (0, 1, 2, 4, 3)), [BLOCK_M, BLOCK_K])
        elif BITS == 2:  # k = 8h + i  ->  p = 2i + h
            a = tl.reshape(a, [BLOCK_M, BLOCK_K // 16, 2, 8])
            a = tl.reshape(tl.permute(a, (0, 1, 3, 2)), [BLOCK_M, BLOCK_K])
    return a
