"""The Triton pieces every kernel shares: the dequantized weight tile, the salient product, the
split-K epilogue, and the rounding to the activation dtype.

* ``deq_tile``: ``(code - zero) [* scale]`` of a [BLOCK_K, BN] block ([BN, BLOCK_K] when
  ``SWAP``) in natural k order. The packed words are loaded once ([BLOCK_K / unit, BN] int32),
  the codes of one word (3 bits: of one 3-word unit) are unpacked by constant shifts into
  separate tensors, ``tl.join``ed into an in-thread minor dimension and reshaped; codes become
  f16/bf16 through the exponent trick (the bits ``0x6400 | code`` are the f16 ``1024 + code``,
  ``0x4300 | code`` the bf16 ``128 + code``; minus ``1024 + zero``: exact).
* ``salient_dot``: the FP16 salient columns as extra K-slices (x gathered by index).
* ``store_output``: bias, cast, store; with split-K, partial sums go through a zeroed fp32
  workspace by relaxed atomics, and the program that arrives last at the tile's counter
  (acq_rel) writes y and zeroes workspace and counter again (no memset launch).

The Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors, the tests) has no inline PTX and
no bf16 arithmetic (it stores bf16 as raw 16-bit words, and its float32 -> bf16 cast truncates).
Kernels therefore take ``EMU`` (bf16 under the interpreter): values then travel as float32 that
hold exactly the bf16-rounded numbers the GPU computes (``act`` rounds to nearest even), and
``tl.dot`` multiplies those in float32, as the tensor cores do bf16 products into fp32.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def act(v, BF16: tl.constexpr, EMU: tl.constexpr):
    """v rounded to the activation dtype (f16 or bf16); under EMU a float32 holding the
    round-to-nearest-even bf16 value."""
    if EMU:
        b = v.to(tl.float32).to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)
    return v.to(tl.bfloat16 if BF16 else tl.float16)


def interpreting() -> bool:
    """True when the kernels were defined under the Triton interpreter (TRITON_INTERPRET=1 at
    import): they then run on CPU tensors, without inline PTX."""
    return isinstance(act, InterpretedFunction)


def register_cap(cfg: dict) -> dict:
    """The launch option capping a kernel's registers, where its configuration names a cap and
    the kernels run compiled (the interpreter takes no such option)."""
    return {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") and not interpreting() else {}


def on_device(device: torch.device):
    """``torch.cuda.device`` for CUDA tensors; nothing for the interpreter's CPU tensors."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _code_minus_zero(code, zf, BF16: tl.constexpr, EMU: tl.constexpr):
    """code - zero, exactly. zf: 1024 + zero (128 + zero for bf16) in the activation dtype, or
    the zero as float32 under EMU."""
    if EMU:
        return code.to(tl.float32) - zf
    h = (code | (0x4300 if BF16 else 0x6400)).to(tl.int16)
    return h.to(tl.bfloat16 if BF16 else tl.float16, bitcast=True) - zf


@triton.jit
def deq_tile(
    q_ptr,
    sz_ptr,
    kb,
    offs_n,
    N,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP: tl.constexpr,
    SCALED: tl.constexpr,
    EMU: tl.constexpr,
):
    """Rows kb..kb+BLOCK_K of W^T: ``code - zero`` (times the scale, rounded to the activation
    dtype as the torch reference rounds it, if SCALED) as [BLOCK_K, BN], or [BN, BLOCK_K] if
    SWAP; and the fp32 scales [BN] of their group. q: GPTQ ``qweight`` for 2/4 bits, the 3-word
    units of ``ptx.pack_3bit`` for 3 bits; sz [G, N] int32 = fp16 scale bits | zero << 16.
    N must be a multiple of BN and BLOCK_K must divide GROUP."""
    BN: tl.constexpr = offs_n.shape[0]
    UNIT_K: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    UNIT_W: tl.constexpr = 3 if BITS == 3 else 1
    L: tl.constexpr = 5 if BITS == 3 else (3 if BITS == 4 else 4)  # log2(UNIT_K)
    RU: tl.constexpr = BLOCK_K // UNIT_K
    sz = tl.load(sz_ptr + (kb // GROUP) * N + offs_n)
    s = (sz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    z = (sz >> 16) & 0xFFFF
    if SWAP:
        s2, z2 = s[:, None], z[:, None]
    else:
        s2, z2 = s[None, :], z[None, :]
    if EMU:
        zf = z2.to(tl.float32)
    else:
        zf = (z2 + (0x4300 if BF16 else 0x6400)).to(tl.int16)
        zf = zf.to(tl.bfloat16 if BF16 else tl.float16, bitcast=True)
    sw = act(s2.to(tl.float32), BF16, EMU)
    units = kb // UNIT_K + tl.arange(0, RU)
    words = ()
    for t in tl.static_range(UNIT_W):
        if SWAP:
            ptrs = q_ptr + (units * UNIT_W + t)[None, :] * N + offs_n[:, None]  # [BN, RU]
        else:
            ptrs = q_ptr + (units * UNIT_W + t)[:, None] * N + offs_n[None, :]  # [RU, BN]
        words = words + (tl.load(ptrs, eviction_policy="evict_first"),)
    lvl = ()
    for r in tl.static_range(UNIT_K):
        if BITS == 3:
            if r == 30:  # codes 30 / 31: bit t of each is bit 15 / 31 of word t
                c = ((words[0] >> 15) & 1) | ((words[1] >> 14) & 2) | ((words[2] >> 13) & 4)
            elif r == 31:
                c = ((words[0] >> 31) & 1) | ((words[1] >> 30) & 2) | ((words[2] >> 29) & 4)
            else:
                c = (words[r // 10] >> (3 * ((r % 10) // 2) + 16 * (r % 2))) & 7
        else:
            c = (words[0] >> (r * BITS)) & ((1 << BITS) - 1)
        w = _code_minus_zero(c, zf, BF16, EMU)
        if SCALED:
            w = act(w * sw, BF16, EMU)
        lvl = lvl + (w,)
    for _ in tl.static_range(L):  # new minor dims of size 2, the top bit of r first
        nxt = ()
        for i in tl.static_range(len(lvl) // 2):
            nxt = nxt + (tl.join(lvl[i], lvl[i + len(lvl) // 2]),)
        lvl = nxt
    tile = lvl[0]  # [BN, RU, 2, .., 2] (SWAP) or [RU, BN, 2, .., 2]
    if not SWAP:
        tile = tl.permute(tl.reshape(tile, [RU, BN, UNIT_K]), (0, 2, 1))
    R0: tl.constexpr = BN if SWAP else BLOCK_K
    R1: tl.constexpr = BLOCK_K if SWAP else BN
    return tl.reshape(tile, [R0, R1]), s.to(tl.float32)


@triton.jit
def salient_dot(
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
    j_end,
    SWAP: tl.constexpr,
    BF16: tl.constexpr,
    EMU: tl.constexpr,
):
    """acc [BM, BN] += x[:, S[j0:j_end]] @ W_S^T[j0:j_end] (acc [BN, BM] and the transposed
    product if SWAP), W_S rounded to the activation dtype, fp32 accumulation."""
    for jj in range(j0, j_end, 32):
        offs_j = jj + tl.arange(0, 32)
        jmask = offs_j < j_end
        sid = tl.load(sidx_ptr + offs_j, mask=jmask, other=0)
        if SWAP:
            a = tl.load(
                wst_ptr + offs_j[None, :] * N + offs_n[:, None], mask=jmask[None, :], other=0.0
            )
            b = tl.load(
                x_ptr + offs_m[None, :] * K + sid[:, None],
                mask=jmask[:, None] & mmask[None, :],
                other=0.0,
            )
        else:
            a = tl.load(
                x_ptr + offs_m[:, None] * K + sid[None, :],
                mask=mmask[:, None] & jmask[None, :],
                other=0.0,
            )
            b = tl.load(
                wst_ptr + offs_j[:, None] * N + offs_n[None, :], mask=jmask[:, None], other=0.0
            )
        acc = tl.dot(act(a, BF16, EMU), act(b, BF16, EMU), acc)
    return acc


@triton.jit
def _finish(
    v,
    yoff,
    omask,
    boff,
    bmask,
    y_ptr,
    bias_ptr,
    HAS_BIAS: tl.constexpr,
    BF16: tl.constexpr,
    EMU: tl.constexpr,
):
    if HAS_BIAS:
        v += tl.load(bias_ptr + boff, mask=bmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + yoff, act(v, BF16, EMU).to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def settle(acc):
    """``acc`` unchanged, each register read by one ``mov``: Triton waits for every MMA that
    writes ``acc`` before it, so none is left pending when the k-loop goes round. Where the
    dequantized weight tile is the MMA's register operand A and the loop accumulates with
    ``tl.dot(a, b, acc)``, Triton (3.6) lets 3-7 MMAs run on past the loop's end, and ptxas
    before 13.3 (Triton bundles 12.8 in 3.6, 12.9 in 3.9) may schedule the next k-step's
    dequantization into the registers those MMAs still read (triton-lang/triton#9433). On the
    H200 that gave a wrong output tile in about one call in six (``t128wr`` with registers
    capped at 168, 2 bits, bf16; docs/KERNELS-NOTES.md, round 18; about one in four at round 20
    with the epilogue fixed). It costs 1.2-1.6x at 64-128 rows (round 20). Compiled kernels
    only (inline PTX); ``testing.compile_for_gpu`` checks the compiled loops."""
    return tl.inline_asm_elementwise(
        "mov.b32 $0, $1;", "=r,r", [acc], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def store_output(
    acc,
    yoff,
    omask,
    boff,
    bmask,
    y_ptr,
    bias_ptr,
    ws_ptr,
    cnt_ptr,
    tile,
    n_parts,
    HAS_BIAS: tl.constexpr,
    DIRECT: tl.constexpr,
    BF16: tl.constexpr,
    EMU: tl.constexpr,
):
    """y[yoff] = acc (+ bias[boff]). DIRECT: acc is the whole sum. Else acc is one of
    ``n_parts`` partial sums of the output tile ``tile``: added into the zeroed workspace
    ``ws`` (same offsets as y); the last arrival at ``cnt[tile]`` reads ws, writes y, and
    re-zeroes ws after a barrier."""
    if DIRECT:
        _finish(acc, yoff, omask, boff, bmask, y_ptr, bias_ptr, HAS_BIAS, BF16, EMU)
    else:
        tl.atomic_add(ws_ptr + yoff, acc, mask=omask, sem="relaxed")
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if done == n_parts - 1:
            out = tl.load(ws_ptr + yoff, mask=omask, other=0.0, cache_modifier=".cg")
            _finish(out, yoff, omask, boff, bmask, y_ptr, bias_ptr, HAS_BIAS, BF16, EMU)
            # every thread has read ws before any zeroes it: Triton may lay the load and the
            # zeroing out over the threads differently (t64: blocked1 / blocked), and a
            # thread then zeroed elements another had yet to read (a zero output element in
            # about one call of 80-500 on the H200, round 20)
            tl.debug_barrier()
            tl.store(ws_ptr + yoff, tl.zeros(acc.shape, tl.float32), mask=omask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")
