"""The CUDA tensor-core kernels for few rows: layout, build, launch.

``mixed_mma.cu`` serves M <= 64 rows with x as the MMA's A operand; ``mixed_mmv.cu`` serves
M <= 16 rows with the operands swapped (the weights as A, x as one or two 8-wide B operands),
which needs half the MMAs and accumulators per weight up to 8 rows; ``mixed_wg.cu`` serves
M >= 64 rows on Hopper's warpgroup MMA (sm_90a only), the weights as its register operand and
x in tiles of 64 to 256 rows shared by two or four warpgroups. All three read the same packed
words, and each is built for fp16 and for bf16 activations (x, bias and y in that type, the
MMAs on it; the salient fragments converted once per layer, ``Packed.salient_as``).

Built once by ``nvcc`` (found on PATH or under ``$CUDA_HOME``) for the GPU's own architecture
(``sm_90a`` on compute capability 9.0, where the warpgroup MMA needs it),
cached under ``$GIFT_QUANT_CACHE/kernels/`` by a digest of the source, the compiler and the
target, and called through ctypes on torch's current stream. Without a CUDA toolkit
:func:`library` returns None and the Triton kernels serve every M (``routes.route``). The
configurations a call takes (warps per block, K splits, clusters) are ``rules``'.

Layout (``pack_codes``): the codes of one 64-deep k-step and one 64-column strip, for one lane
``4 g + t`` of a warp, are BITS x 16 bytes: 4 k16 steps x BITS words; each word a list of
(k, k + 1) pairs of one column, one pair per (n8 tile j, fragment half f), at bit ``p * BITS`` of
the word's two 16-bit halves (pair p = 2 j + f, 4 / 8 / 5 pairs per word for 4 / 2 / 3 bits; the
16th 3-bit pair spread over bit 15 of the three words). Pair (j, f) of step st holds rows
``16 st + 8 f + 2 t`` (+1) of column ``8 j + g``: the B fragment of ``mma.m16n8k16``. The
lane's bytes are BITS 16-byte vectors, stored vector-major (vector i of the 32 lanes together),
so each load instruction of a warp reads 512 contiguous bytes. ``unpack_codes`` inverts it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from gift_quant.kernels.build import cached_build, compiler_version
from gift_quant.kernels.cuda.rules import (
    MMV_DEPTH,
    choose,
    dependent_launch,
    mmv_choose,
    wg_choose,
)

log = logging.getLogger(__name__)

__all__ = [
    "Packed",
    "library",
    "mixed_mma",
    "mixed_mmv",
    "mixed_wg",
    "pack",
    "pack_codes",
    "unpack_codes",
    "unsupported",
    "wg_available",
]

SOURCES = tuple(
    Path(__file__).with_name(n) for n in ("mixed_mma.cu", "mixed_mmv.cu", "mixed_wg.cu")
)
HEADER = Path(__file__).with_name("fragments.cuh")
_lock = threading.Lock()
_state: dict = {}


# ------------------------------------------------------------------------------------------
# layout (pure torch; also what the CPU tests check)


def _pair_fields(bits: int) -> list[tuple[int, int]]:
    """(word, bit position in the half) of pair p = 0..15 within one k16 step's BITS words
    (the 16th 3-bit pair has no single field: word -1)."""
    per = {4: 4, 2: 8, 3: 5}[bits]
    return [(-1, 15) if bits == 3 and p == 15 else (p // per, p % per * bits) for p in range(16)]


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
    c = _fragment_order(codes.to(torch.int64))  # [S, B, 32, 4, 16, 2]
    words = torch.zeros(*c.shape[:4], bits, dtype=torch.int64, device=codes.device)
    for p, (w, pos) in enumerate(_pair_fields(bits)):
        for h in range(2):
            code = c[..., p, h]
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
    for w, pos in _pair_fields(bits):
        halves = []
        for h in range(2):
            if w >= 0:
                halves.append((words[..., w] >> (16 * h + pos)) & mask)
            else:
                halves.append(sum(((words[..., i] >> (16 * h + 15)) & 1) << i for i in range(3)))
        pairs.append(torch.stack(halves, -1))
    c = torch.stack(pairs, -2)  # [S, B, 32, 4, 16, 2] = s b (g t) st (j f) h
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


# ------------------------------------------------------------------------------------------
# build and launch


_P, _I = ctypes.c_void_p, ctypes.c_int
# the library's entry points (`extern "C"` in the sources; a test reads them there): x, codes,
# zero-points, scales, salient weights, salient indices, nsal, bias, y, workspace, counters,
# M, N, K, group, bits, bf16 (x, bias and y bf16, else fp16), then each kernel's
# configuration, pdl, stream
ENTRY_ARGS = {
    "gq_mixed_mma": [_P] * 6 + [_I] + [_P] * 4 + [_I] * 10 + [_P],  # wn, splits, csize
    "gq_mixed_mmv": [_P] * 6 + [_I] + [_P] * 4 + [_I] * 11 + [_P],  # wn, splits, depth, csize
    "gq_mixed_wg": [_P] * 6 + [_I] + [_P] * 4 + [_I] * 9 + [_P, _I, _P],  # nt, wgs, splits, xs
}


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _build(nvcc: str, arch: str) -> Path:
    """The three sources compiled side by side (each its own nvcc), then linked."""
    gencode = f"-gencode=arch=compute_{arch},code=sm_{arch}"

    def obj(scratch: str, source: Path) -> str:
        return str(Path(scratch) / f"{source.stem}.o")

    return cached_build(
        "mixed_mma",
        [*(f.read_text() for f in (HEADER, *SOURCES)), compiler_version(nvcc), arch],
        lambda out, scratch: (
            [nvcc, gencode, "-shared", "-o", out] + [obj(scratch, f) for f in SOURCES]
        ),
        timeout=900,
        parts=lambda scratch: [
            [nvcc, "-O3", gencode, "-Xcompiler", "-fPIC", "-c", "-o", obj(scratch, f), str(f)]
            for f in SOURCES
        ],
    )


def library(device: torch.device | None = None):
    """The loaded kernel library, or None (no CUDA, no nvcc, a GPU older than sm_80, or a
    failed build; the reason is logged once). ``GIFT_QUANT_CUDA_KERNEL=0`` turns it off."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib = None
        try:
            if os.environ.get("GIFT_QUANT_CUDA_KERNEL", "1") == "0":
                raise RuntimeError("GIFT_QUANT_CUDA_KERNEL=0")
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                raise RuntimeError(f"compute capability {major}.{minor} (needs 8.0+)")
            nvcc = _nvcc()
            if nvcc is None:
                raise RuntimeError("no nvcc on PATH or under CUDA_HOME")
            # 9.0: the arch-specific target, which the warpgroup MMA (mixed_wg.cu) needs
            arch = "90a" if (major, minor) == (9, 0) else f"{major}{minor}"
            lib = ctypes.CDLL(str(_build(nvcc, arch)))
            _state["wg"] = arch == "90a"
            for name, args in ENTRY_ARGS.items():
                getattr(lib, name).argtypes = args
                getattr(lib, name).restype = ctypes.c_int
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            log.info("CUDA tensor-core kernel unavailable (%s); Triton serves every M", exc)
            lib = None
        _state["lib"] = lib
        return lib


def _launch(fn, x2: Tensor, p: Packed, bias, ws, cnt, out, *config) -> Tensor:
    """y [M, N] in x2's type (fp16 or bf16) through the library entry ``fn`` with ``config``
    (written into ``out`` if given), on x2's device and torch's current stream there, as a
    programmatic dependent launch where ``rules.dependent_launch`` says so. The bias, ``out``
    and the salient fragments must be in x2's type: anything else is refused, not cast."""
    M, K = x2.shape
    dt = x2.dtype
    if dt not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{fn.__name__}: x is {dt}; the kernels take float16 or bfloat16")
    for what, t in (("bias", bias), ("out", out), ("salient fragments", p.wsp)):
        if t is not None and t.dtype != dt:
            raise ValueError(f"{fn.__name__}: {what} is {t.dtype}, x is {dt}: they must match")
    y = out if out is not None else torch.empty(M, p.N, dtype=dt, device=x2.device)
    if x2.data_ptr() % 16 or not x2.is_contiguous():
        x2 = x2.contiguous().clone()
    if x2.device.index != torch.cuda.current_device():  # the launch uses the current device
        with torch.cuda.device(x2.device):
            return _launch(fn, x2, p, bias, ws, cnt, y, *config)
    rc = fn(
        x2.data_ptr(),
        p.qc.data_ptr(),
        p.zp.data_ptr(),
        p.scp.data_ptr(),
        p.wsp.data_ptr(),
        p.sidx.data_ptr(),
        p.nsal,
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        ws.data_ptr(),
        cnt.data_ptr(),
        M,
        p.N,
        K,
        p.group,
        p.bits,
        int(dt == torch.bfloat16),
        *config,
        int(dependent_launch(x2.device)),
        torch.cuda.current_stream(x2.device).cuda_stream,
    )
    if rc:
        raise RuntimeError(f"{fn.__name__} failed (code {rc}) for M={M} N={p.N} K={K} {config}")
    return y


def mixed_mmv(
    x2: Tensor,
    p: Packed,
    bias: Tensor | None,
    ws: Tensor,
    cnt: Tensor,
    wn: int = 0,
    splits: int = 0,
    out: Tensor | None = None,
    depth: int = MMV_DEPTH,
    cluster: int = 1,
) -> Tensor:
    """As :func:`mixed_mma` for M <= ``rules.MMV_MAX_M`` rows, by the swapped kernel
    (``mixed_mmv.cu``); ``depth``: one of ``rules.MMV_DEPTHS``; ``cluster`` > 1 (sm_90+,
    MMV_DEPTH only, dividing the splits the launch runs, at most 16): the splits add up in
    thread-block clusters of that many blocks."""
    if not wn:
        wn, splits = mmv_choose(x2.shape[0], p.N, x2.shape[1])
    fn = _state["lib"].gq_mixed_mmv
    return _launch(fn, x2, p, bias, ws, cnt, out, wn, splits, depth, cluster)


def mixed_mma(
    x2: Tensor,
    p: Packed,
    bias: Tensor | None,
    ws: Tensor,
    cnt: Tensor,
    wn: int = 0,
    splits: int = 0,
    cluster: int = 1,
    out: Tensor | None = None,
) -> Tensor:
    """y [M, N] = x2 [M, K] @ dequant(W)^T + x2[:, S] @ W_S^T (+ bias), fp16 or bf16; ``ws``/``cnt``
    are the zeroed split-K workspace, ``wn``/``splits`` the configuration (0: ``rules.choose``);
    ``cluster`` > 1 (sm_90+, dividing the splits the launch runs, at most 16): the splits add
    up in thread-block clusters of that many blocks."""
    if not wn:  # the rule's configuration, without clusters
        (wn, splits), cluster = choose(x2.shape[0], p.N, x2.shape[1]), 1
    return _launch(_state["lib"].gq_mixed_mma, x2, p, bias, ws, cnt, out, wn, splits, cluster)


def wg_available() -> bool:
    """Whether the loaded library has the warpgroup-MMA kernel (built for sm_90a)."""
    return _state.get("lib") is not None and _state.get("wg", False)


def mixed_wg(
    x2: Tensor,
    p: Packed,
    bias: Tensor | None,
    ws: Tensor,
    cnt: Tensor,
    nt: int = 0,
    wgs: int = 0,
    splits: int = 0,
    out: Tensor | None = None,
) -> Tensor:
    """As :func:`mixed_mma` for any M, on the warpgroup MMA (``mixed_wg.cu``, sm_90a: see
    :func:`wg_available`): tiles of ``nt`` (64, 128 or 256) rows of x, ``wgs`` warpgroups (64
    output columns each) per block, ``splits`` K splits (0: ``rules.wg_choose``). With salient
    columns, a first small kernel gathers them from x into a buffer of M x 64 ceil(nsal / 64)
    halves, which the kernel loads as it loads x."""
    if not wg_available():
        raise RuntimeError("the warpgroup-MMA kernel needs a build for sm_90a")
    if not nt:
        nt, wgs, splits = wg_choose(x2.shape[0], p.N, x2.shape[1])
    xs = None  # kept alive by this frame until the launches are queued
    if p.nsal:
        xs = torch.empty(x2.shape[0], -(-p.nsal // 64) * 64, dtype=x2.dtype, device=x2.device)
    xs_ptr = None if xs is None else xs.data_ptr()
    return _launch(_state["lib"].gq_mixed_wg, x2, p, bias, ws, cnt, out, nt, wgs, splits, xs_ptr)
