"""The CUDA kernels' layout of a layer (pure torch; what the CPU tests check): the packed
codes, zero-points, scales and salient fragments all three kernels read, made once per layer
(``pack``) and kept beside the Triton kernels' own.

``pack_codes``: the codes of one 64-deep k-step and one 64-column strip, for one lane
``4 g + t`` of a warp, are BITS x 16 bytes: 4 k16 steps x BITS words; each word a list of
(k, k + 1) pairs of one column, one pair per (n8 tile j, fragment half f), slot s at bit ``s *
BITS`` of the word's two 16-bit halves (4 / 8 / 5 slots per word for 4 / 2 / 3 bits), pair p =
2 j + f in slot ``_pair_slots`` (at 3 bits the 16th slot is spread over bit 15 of the three
words, and which pairs lie in which slots turns with the k16 step). Pair (j, f) of step st
holds rows ``16 st + 8 f + 2 t`` (+1) of column ``8 j + g``: the B fragment of ``mma.m16n8k16``. The
lane's bytes are BITS 16-byte vectors, stored vector-major (vector i of the 32 lanes together),
so each load instruction of a warp reads 512 contiguous bytes. ``unpack_codes`` inverts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = [
    "Packed",
    "pack",
    "pack_codes",
    "pack_salient",
    "pack_scales",
    "pack_zeros",
    "unpack_codes",
    "unsupported",
]


def w3_rest(st: int) -> int:
    """3 bits: the warpgroup kernel's warp that takes k16 step ``st``'s slots 4, 9, 14 and 15
    (fragments.cuh, ``w3_rest``); the other three take one word each."""
    return (st + 3) % 4


def _slot_fields(bits: int) -> list[tuple[int, int]]:
    """(word, bit position in the half) of slot 0..15 within one k16 step's BITS words (the
    16th 3-bit slot has no single field: word -1)."""
    per = {4: 4, 2: 8, 3: 5}[bits]
    return [(-1, 15) if bits == 3 and s == 15 else (s // per, s % per * bits) for s in range(16)]


def _pair_slots(bits: int, st: int) -> list[int]:
    """The slot of each pair p = 2 j + f in k16 step ``st`` (fragments.cuh, ``pair_slot``).
    2 and 4 bits: of warp q's pairs 4 q + u (u = 0, 1 one column's two k halves, 2, 3 the
    other's), u = 0, 2 lie in the low byte of each half and u = 1, 3 at the same bits of its
    high byte, so one column's codes share a bit position and one shift by 8 reaches both
    bytes. 3 bits: warp ``w3_rest(st)``'s pairs u = 0, 1, 2, 3 in slots 4, 9, 14, 15 (bits 12..14
    of the three words, the spread slot); each other warp's in one word k (0, 1, 2 in warp
    order after it), u = 0, 2, 1, 3 in slots 5 k .. 5 k + 3 (bits 0, 3, 6, 9): one column's
    codes at bit 0 or 3 of the word and of the word shifted by 6 (the lo column at 0, the hi
    at 3, as slot 14 shifted by 9 and the spread pair built at bit 3)."""
    if bits == 4:
        return [(p & ~3) + (p & 1) * 2 + ((p >> 1) & 1) for p in range(16)]
    if bits == 2:
        return [(p & ~7) + (p & 1) * 4 + ((p >> 2) & 1) * 2 + ((p >> 1) & 1) for p in range(16)]
    rest, slots = w3_rest(st), []
    for p in range(16):
        q, u = divmod(p, 4)
        if q == rest:
            slots.append((4, 9, 14, 15)[u])
        else:
            slots.append(5 * ((q - rest - 1) % 4) + (u & 1) * 2 + (u >> 1))
    return slots


def _by_slot(c: Tensor, bits: int, inverse: bool = False) -> Tensor:
    """[..., 4 steps, 16 pairs, 2] in pair order -> slot order (``inverse``: back)."""
    steps = []
    for st in range(4):
        slots = _pair_slots(bits, st)
        take = slots if inverse else sorted(range(16), key=slots.__getitem__)
        steps.append(c[..., st, take, :])
    return torch.stack(steps, dim=-3)


def _fragment_order(t: Tensor) -> Tensor:
    """[K, N, ...] -> [K/64, N/64, 32 lanes, 4 k16 steps, 16 pairs, 2 halves, ...]: element
    (s, b, 4g + t, st, 2j + f, h) is row 64 s + 16 st + 8 f + 2 t + h, column 64 b + 8 j + g."""
    K, N = t.shape[:2]
    rest = t.shape[2:]
    v = t.reshape(K // 64, 4, 2, 4, 2, N // 64, 8, 8, *rest)  # s st f t h | b j g
    v = v.permute(0, 5, 7, 3, 1, 6, 2, 4, *range(8, 8 + len(rest)))  # s b g t st j f h
    return v.reshape(K // 64, N // 64, 32, 4, 16, 2, *rest)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Codes [K, N] (0 .. 2^bits - 1) -> int32 [K/64, N/64, bits, 32, 4] in the kernel's
    layout (module docstring): lane l's 4 * bits words are [:, :, i, l, :] for i < bits."""
    K, N = codes.shape
    c = _by_slot(_fragment_order(codes.to(torch.int64)), bits)  # [S, B, 32, 4, 16 slots, 2]
    words = torch.zeros(*c.shape[:4], bits, dtype=torch.int64, device=codes.device)
    for sl, (w, pos) in enumerate(_slot_fields(bits)):
        for h in range(2):
            code = c[..., sl, h]
            if w >= 0:
                words[..., w] |= code << (16 * h + pos)
            else:  # bit i of the code at bit 15 of word i's half
                for i in range(3):
                    words[..., i] |= ((code >> i) & 1) << (16 * h + 15)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    # [S, B, 32 lanes, 4 steps x bits words] -> word-vector i (4 words) of all lanes together
    words = words.reshape(K // 64, N // 64, 32, bits, 4).transpose(2, 3)
    return words.contiguous()


def unpack_codes(packed: Tensor, bits: int, K: int, N: int) -> Tensor:
    """The inverse of :func:`pack_codes`: codes [K, N] int32."""
    words = packed.to(torch.int64).reshape(K // 64, N // 64, bits, 32, 4).transpose(2, 3)
    words = words.reshape(K // 64, N // 64, 32, 4, bits) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    pairs = []
    for w, pos in _slot_fields(bits):
        halves = []
        for h in range(2):
            if w >= 0:
                halves.append((words[..., w] >> (16 * h + pos)) & mask)
            else:
                halves.append(sum(((words[..., i] >> (16 * h + 15)) & 1) << i for i in range(3)))
        pairs.append(torch.stack(halves, -1))
    c = _by_slot(torch.stack(pairs, -2), bits, inverse=True)  # s b (g t) st (j f) h
    c = c.reshape(K // 64, N // 64, 8, 4, 4, 8, 2, 2)  # s b g t st j f h
    c = c.permute(0, 4, 6, 3, 7, 1, 5, 2)  # s st f t h | b j g
    return c.reshape(K, N).to(torch.int32)


def pack_zeros(zeros: Tensor) -> Tensor:
    """Integer zero-points [G, N] -> uint8 [G, N/64, 8 (g), 8 (j)]: the zero-point of column
    64 b + 8 j + g, so lane 4 g + t reads its B-fragment columns' eight in one 8-byte load."""
    G, N = zeros.shape
    return zeros.to(torch.uint8).reshape(G, N // 64, 8, 8).transpose(2, 3).contiguous()


def pack_scales(scales: Tensor) -> Tensor:
    """fp16 scales [G, N] -> fp16 [G, N/64, 4 (t), 8 (j), 2 (c)]: the scale of column
    64 b + 8 j + 2 t + c, so lane 4 g + t reads the columns of its accumulator fragment in
    32 bytes (the scale after the MMA); before the MMA, lane 4 g + t reads row t = g // 2 and
    takes half c = g % 2 (column 8 j + g)."""
    G, N = scales.shape
    v = scales.to(torch.float16).reshape(G, N // 64, 8, 4, 2)  # b j t c
    return v.transpose(2, 3).contiguous()


def pack_salient(wst: Tensor) -> Tensor:
    """W_S^T [k, N] -> fp16 B fragments [ceil(k/16), N/64, 4, 32, 8] (k padded with zero
    rows; bf16 launches convert them element by element, ``Packed.salient_as``): pair
    p = 2 j + f of lane 4 g + t, at [q, b, p // 4, l, 2 (p % 4) ..], is (rows 16 q + 8 f + 2 t,
    +1; column 8 j + g)."""
    k, N = wst.shape
    pad = -k % 16
    w = torch.cat([wst, wst.new_zeros(pad, N)]) if pad else wst
    kq = w.shape[0]
    v = w.to(torch.float16).reshape(kq // 16, 2, 4, 2, N // 64, 8, 8)  # q f t h | b j g
    v = v.permute(0, 4, 6, 2, 5, 1, 3)  # q b g t j f h
    v = v.reshape(kq // 16, N // 64, 32, 4, 8).transpose(2, 3)  # word-vectors of all lanes
    return v.contiguous()


# ------------------------------------------------------------------------------------------
# the layer


@dataclass
class Packed:
    """One layer's tensors in the kernel's layout (``wsp``: the salient fragments, in the
    activations' type: fp16 as packed, bf16 by :meth:`salient_as`)."""

    qc: Tensor
    zp: Tensor
    scp: Tensor
    wsp: Tensor
    sidx: Tensor
    nsal: int
    bits: int
    group: int
    K: int
    N: int
    converted: dict = field(default_factory=dict, repr=False, compare=False)

    def salient_as(self, dtype: torch.dtype, build: bool = True) -> Tensor | None:
        """The salient fragments in ``dtype`` (the same layout element by element): ``wsp``,
        or its bf16 copy, made once and kept (None where it is not made yet and ``build`` is
        off). Only fp16 fragments are converted, to bf16, as the Triton kernels and the torch
        reference convert the fp16 salient weights; not inside CUDA-graph capture (the copy
        would only be written when the graph replays)."""
        if self.wsp.dtype == dtype:
            return self.wsp
        if (self.wsp.dtype, dtype) != (torch.float16, torch.bfloat16):
            raise ValueError(
                f"salient fragments are {self.wsp.dtype}; only float16 ones convert (to "
                f"bfloat16), not to {dtype}"
            )
        if dtype not in self.converted and build:
            if self.wsp.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "a layer's bf16 salient fragments are made at its first bf16 call: run it "
                    "once before capturing a CUDA graph"
                )
            self.converted[dtype] = self.wsp.to(dtype)
        return self.converted.get(dtype)

    def for_type(self, dtype: torch.dtype) -> Packed:
        """This layout with its salient fragments in ``dtype`` (itself where they are)."""
        if self.wsp.dtype == dtype:
            return self
        return replace(self, wsp=self.salient_as(dtype), converted={})


def unsupported(layer) -> str | None:
    """Why the kernel cannot compute a layer (object with the GPTQ tensors), or None."""
    K, N, bits = layer.in_features, layer.out_features, layer.bits
    group = K if layer.group_size == -1 else layer.group_size
    if bits not in (2, 3, 4):
        return f"{bits}-bit codes"
    if N % 64 or K % 64 or group % 64 or K % group:
        return f"shape {N}x{K}, group {group} (needs multiples of 64)"
    return None


def pack(
    codes: Tensor,
    zeros: Tensor,
    scales: Tensor,
    wst: Tensor | None,
    sidx: Tensor | None,
    bits: int,
    group: int,
) -> Packed:
    """The kernel layout from unpacked codes [K, N], zeros/scales [G, N], W_S^T [k, N]."""
    K, N = codes.shape
    dev = codes.device
    if wst is not None and wst.numel():
        wsp, si, nsal = pack_salient(wst), sidx.to(torch.int32).contiguous(), wst.shape[0]
    else:
        wsp = torch.zeros(1, 8, dtype=torch.float16, device=dev)
        si, nsal = torch.zeros(1, dtype=torch.int32, device=dev), 0
    return Packed(
        pack_codes(codes, bits),
        pack_zeros(zeros),
        pack_scales(scales),
        wsp,
        si,
        nsal,
        bits,
        group,
        K,
        N,
    )
