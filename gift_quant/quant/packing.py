"""GPTQ bit packing (docs/FORMAT.md#packing-qweight-qzeros), for 2, 3, 4 and 8 bits.

Every 32 consecutive values along the packed dimension form a little-endian bit stream of
``32 * bits`` bits: value j occupies stream bits ``[j*bits, (j+1)*bits)`` and stream bit s lives
in word ``s // 32`` at bit ``s % 32``. For 2/4/8 bits no value crosses a word; for 3 bits this
is exactly GPTQ's "10|1|10|1|10" three-word scheme. Words are stored as int32 bit patterns.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_rows", "unpack_rows", "pack_cols", "unpack_cols"]

_MASK32 = 0xFFFFFFFF


def _check(bits: int, n: int, what: str) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    if n % 32:
        raise ValueError(f"GPTQ packing needs {what} divisible by 32, got {n}")


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack ``codes`` [K, N] (integers in [0, 2**bits)) along dim 0 -> int32 [K*bits/32, N]."""
    K, N = codes.shape
    _check(bits, K, "the packed dimension")
    c = codes.to(torch.int64).reshape(K // 32, 32, N)
    words = torch.zeros(K // 32, bits, N, dtype=torch.int64, device=codes.device)
    for j in range(32):
        s = j * bits
        w, off = divmod(s, 32)
        words[:, w] |= (c[:, j] << off) & _MASK32
        if off + bits > 32:  # 3-bit values that straddle two words
            words[:, w + 1] |= c[:, j] >> (32 - off)
    words = words.reshape(K // 32 * bits, N)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_rows`: int32 [K*bits/32, N] -> int32 codes [K, N]."""
    R, N = packed.shape
    if bits not in (2, 3, 4, 8) or R % bits:
        raise ValueError(f"packed rows {R} is not a multiple of bits={bits}")
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # no value straddles a word: one broadcast shift
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        out = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask  # [R, 32/bits, N]
        return out.reshape(R * 32 // bits, N)
    words = (packed.to(torch.int64) & _MASK32).reshape(R // bits, bits, N)
    out = torch.empty(R // bits, 32, N, dtype=torch.int64, device=packed.device)
    for j in range(32):  # 3 bits: values straddle words; per-value shifts
        w, off = divmod(j * bits, 32)
        v = words[:, w] >> off
        if off + bits > 32:
            v = v | (words[:, w + 1] << (32 - off))
        out[:, j] = v & mask
    return out.reshape(R // bits * 32, N).to(torch.int32)


def pack_cols(codes: Tensor, bits: int) -> Tensor:
    """Pack ``codes`` [G, N] along dim 1 -> int32 [G, N*bits/32] (GPTQ ``qzeros``)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_cols`: int32 [G, N*bits/32] -> int32 [G, N]."""
    return unpack_rows(packed.t(), bits).t().contiguous()
