"""Word layouts of the Triton kernels and the inline PTX with which the decode GEMV unpacks them.

A *unit* is the run of int32 words that holds ``unit_k`` consecutive input columns of one
output column:

* 4 bits: 2 words, 16 codes, GPTQ order (code i at bits 4i of word i // 8), ``qweight`` as
  stored;
* 2 bits: 1 word, 16 codes (code i at bits 2i), exactly ``qweight`` as stored;
* 3 bits: 3 words, 32 codes, repacked at load by :func:`pack_3bit` (GPTQ's 3-bit stream
  crosses word boundaries). Word t holds codes 10t + 2s at bits 3s and codes 10t + 2s + 1 at
  bits 16 + 3s (s < 5); codes 30 and 31 are spread over bit 15 and bit 31 of the three words.

Unpacking uses the "magic number" trick: ``(word >> shift) & mask | MAGIC`` is a pair of
halves equal to ``2**m + 2**p * code`` (m = 10 for f16, 7 for bf16; p is the code's bit offset
inside the 16-bit half), and one ``fma`` by ``2**-p`` with ``-(2**(m-p) + zero)`` turns it into
``code - zero`` exactly. One lop3 + one fma per two weights; the lo/hi halves of a pair hold
the codes ``lo_k``/``hi_k`` of :class:`Step`. Every constant is generated here, and
:func:`emulate` replays a plan bit by bit so CPU tests can check it against the packing spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

__all__ = [
    "Plan",
    "deqdot_asm",
    "emulate",
    "pack_3bit",
    "plan",
    "zero_consts",
]

# kind -> (magic bits, mantissa bits, exponent field of the magic, exponent bias)
_FORMATS = {"f16": (0x6400, 10, 25, 15), "bf16": (0x4300, 7, 134, 127)}


@dataclass(frozen=True)
class Step:
    """One f16x2/bf16x2 pair: ``word`` >> ``shift``, masked at bit ``p`` (word -1: the spill)."""

    word: int
    shift: int
    p: int
    lo_k: int
    hi_k: int


@dataclass(frozen=True)
class Plan:
    bits: int
    kind: str  # "f16" or "bf16": the arithmetic type of the pairs
    unit_words: int
    unit_k: int
    steps: tuple[Step, ...]

    @property
    def positions(self) -> tuple[int, ...]:
        """Bit offsets p in use; the kernels pass one zero constant per position, in order."""
        return tuple(sorted({s.p for s in self.steps}))


def _slots(bits: int) -> list[tuple[int, int, int, int]]:
    """(word, bit offset in the low half, lo code, hi code) of every pair of a unit."""
    if bits == 3:
        return [(t, 3 * s, 10 * t + 2 * s, 10 * t + 2 * s + 1) for t in range(3) for s in range(5)]
    if bits == 4:  # two words, so that one f16x2 chain covers 16 weights
        return [(t, 4 * i, 8 * t + i, 8 * t + i + 4) for t in range(2) for i in range(4)]
    return [(0, 2 * i, i, i + 8) for i in range(8)]


@cache
def plan(bits: int, kind: str) -> Plan:
    if bits not in (2, 3, 4):
        raise ValueError(f"the Triton kernels support 2, 3 and 4 bits, got {bits}")
    mant = _FORMATS[kind][1]
    steps, shift = [], {}
    for word, off, lo, hi in _slots(bits):
        if word not in shift or off - shift[word] + bits > mant:
            shift[word] = off  # re-shift when the code would leave the mantissa
        steps.append(Step(word, shift[word], off - shift[word], lo, hi))
    if bits == 3:
        steps.append(Step(-1, 0, 0, 30, 31))
    unit_words = {2: 1, 3: 3, 4: 2}[bits]
    return Plan(bits, kind, unit_words, 32 if bits == 3 else 16, tuple(steps))


def zero_consts(p: Plan) -> list[tuple[int, int]]:
    """Per position p: (multiplier, addend) with ``z * mult + add`` == the int32 bit pattern of
    the pair (-(2**(m-p) + z), -(2**(m-p) + z)) (wrapping int32 arithmetic, no carries)."""
    _, mant, exp, _ = _FORMATS[p.kind]
    out = []
    for pos in p.positions:
        base = 0x8000 | ((exp - pos) << mant)
        add = base * 0x10001
        out.append(((1 << pos) * 0x10001, add - (1 << 32) if add >= 1 << 31 else add))
    return out


def _pairs_ptx(p: Plan, words: list[str], consts: list[str]) -> tuple[list[str], list[str]]:
    """PTX lines computing one b32 register per step; returns (lines, register names)."""
    magic, mant, _, bias = _FORMATS[p.kind]
    ty = "f16x2" if p.kind == "f16" else "bf16x2"
    cidx = {pos: i for i, pos in enumerate(p.positions)}
    regs = [".reg .b32 mg, u0, u1, u2;"]
    lines = [f"mov.b32 mg, {magic * 0x10001:#010x};"]
    for pos in p.positions:
        regs.append(f".reg .b32 sc{pos};")
        lines.append(f"mov.b32 sc{pos}, {((bias - pos) << mant) * 0x10001:#010x};")
    shifted: dict[tuple[int, int], str] = {}
    masks: dict[int, str] = {}
    names = []
    for i, st in enumerate(p.steps):
        regs.append(f".reg .b32 t{i}, p{i};")
        if st.word >= 0:
            key = (st.word, st.shift)
            if st.shift and key not in shifted:
                shifted[key] = f"s{len(shifted)}"
                regs.append(f".reg .b32 {shifted[key]};")
                lines.append(f"shr.u32 {shifted[key]}, {words[st.word]}, {st.shift};")
            src = shifted.get(key, words[st.word])
            mask = ((1 << p.bits) - 1) << st.p
            if mask not in masks:
                masks[mask] = f"mk{len(masks)}"
                regs.append(f".reg .b32 {masks[mask]};")
                lines.append(f"mov.b32 {masks[mask]}, {mask * 0x10001:#010x};")
            lines.append(f"lop3.b32 t{i}, {src}, {masks[mask]}, mg, 0xea;")
        else:  # 3-bit spill: bit j of codes 30/31 sits at bits 15/31 of word j
            regs.append(".reg .b32 b0, b1, b2;")
            lines += [
                "mov.b32 b0, 0x00010001;",
                "mov.b32 b1, 0x00020002;",
                "mov.b32 b2, 0x00040004;",
            ]
            lines.append(f"shr.u32 u0, {words[0]}, 15;")
            lines.append(f"shr.u32 u1, {words[1]}, 14;")
            lines.append(f"shr.u32 u2, {words[2]}, 13;")
            lines.append(f"lop3.b32 t{i}, u0, b0, mg, 0xea;")
            lines.append(f"lop3.b32 t{i}, u1, b1, t{i}, 0xea;")
            lines.append(f"lop3.b32 t{i}, u2, b2, t{i}, 0xea;")
        lines.append(f"fma.rn.{ty} p{i}, t{i}, sc{st.p}, {consts[cidx[st.p]]};")
        names.append(f"p{i}")
    return regs + lines, names


def _wrap(body: list[str]) -> str:
    return "{\n" + "\n".join(body) + "\n}"


@cache
def deqdot_asm(bits: int, kind: str, rows: int, chain: int = 8) -> tuple[str, str]:
    """Dequantize one unit and dot it with ``rows`` rows of packed x pairs.

    Operands: outputs $0..$(rows-1) (f32), then the words, the zero constants, then for each row
    one packed x pair per step (x[lo_k], x[hi_k]). Products are accumulated in f16x2/bf16x2
    over at most ``chain`` pairs, then converted and summed in fp32 (chains of 4 measured 5-18%
    slower on the H200 and no closer to the reference: docs/KERNELS-NOTES.md)."""
    p = plan(bits, kind)
    ty = "f16x2" if kind == "f16" else "bf16x2"
    nsteps = len(p.steps)
    base = rows + p.unit_words
    words = [f"${rows + i}" for i in range(p.unit_words)]
    consts = [f"${base + i}" for i in range(len(p.positions))]
    xbase = base + len(p.positions)
    lines, names = _pairs_ptx(p, words, consts)
    lines.insert(0, ".reg .b32 a, f0, f1;")
    lines.insert(0, ".reg .b16 lo, hi;")
    for r in range(rows):
        for c0 in range(0, nsteps, chain):
            idx = range(c0, min(c0 + chain, nsteps))
            for j, i in enumerate(idx):
                x = f"${xbase + r * nsteps + i}"
                if j == 0:
                    lines.append(f"mul.rn.{ty} a, {names[i]}, {x};")
                else:
                    lines.append(f"fma.rn.{ty} a, {names[i]}, {x}, a;")
            if kind == "f16":
                lines += ["mov.b32 {lo, hi}, a;", "cvt.f32.f16 f0, lo;", "cvt.f32.f16 f1, hi;"]
            else:  # a bf16 is the top half of an f32
                lines += ["shl.b32 f0, a, 16;", "and.b32 f1, a, 0xffff0000;"]
            if c0 == 0:
                lines.append(f"add.f32 ${r}, f0, f1;")
            else:
                lines += [f"add.f32 ${r}, ${r}, f0;", f"add.f32 ${r}, ${r}, f1;"]
    n_in = p.unit_words + len(p.positions) + rows * nsteps
    return _wrap(lines), ",".join(["=f"] * rows + ["r"] * n_in)


# ------------------------------------------------------------------------------------------
# Layout (torch, load time) and a bit-exact replay of a plan (tests)


def pack_3bit(codes: Tensor) -> Tensor:
    """codes [K, N] (0..7) -> int32 [K/32*3, N] in the 3-bit unit layout above."""
    K, N = codes.shape
    if K % 32:
        raise ValueError(f"3-bit repacking needs K divisible by 32, got {K}")
    c = codes.to(torch.int64).reshape(K // 32, 32, N)
    words = torch.zeros(K // 32, 3, N, dtype=torch.int64, device=codes.device)
    for t in range(3):
        for s in range(5):
            words[:, t] |= c[:, 10 * t + 2 * s] << (3 * s)
            words[:, t] |= c[:, 10 * t + 2 * s + 1] << (16 + 3 * s)
        words[:, t] |= ((c[:, 30] >> t) & 1) << 15
        words[:, t] |= ((c[:, 31] >> t) & 1) << 31
    words = words.reshape(K // 32 * 3, N)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _decode(bits16: Tensor, kind: str) -> Tensor:
    if kind == "f16":
        return bits16.to(torch.int16).view(torch.float16).double()
    return (bits16.to(torch.int32) << 16).view(torch.float32).double()


def emulate(p: Plan, words: list[Tensor], zero: Tensor) -> Tensor:
    """Replay the plan on int64 words (each [...]) -> [..., unit_k] float64 (code - zero)."""
    magic, mant, _, _ = _FORMATS[p.kind]
    m2 = magic * 0x10001
    w = [x.to(torch.int64) & 0xFFFFFFFF for x in words]
    out = torch.empty(*w[0].shape, p.unit_k, dtype=torch.float64)
    for st in p.steps:
        if st.word >= 0:
            mask = (((1 << p.bits) - 1) << st.p) * 0x10001
            t = ((w[st.word] >> st.shift) & mask) | m2
        else:
            t = ((w[0] >> 15) & 0x10001) | ((w[1] >> 14) & 0x20002) | ((w[2] >> 13) & 0x40004) | m2
        for half, k in ((0, st.lo_k), (16, st.hi_k)):
            v = _decode((t >> half) & 0xFFFF, p.kind)
            out[..., k] = v * 2.0**-st.p - (2.0 ** (mant - st.p) + zero.double())
    return out
