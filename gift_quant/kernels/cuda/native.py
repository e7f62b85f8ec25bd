"""The CUDA tensor-core kernels: build and launch (their layout: ``layout.py``).

``mixed_mma.cu`` serves M <= 64 rows with x as the MMA's A operand; ``mixed_mmv.cu`` serves
M <= 16 rows with the operands swapped (the weights as A, x as one or two 8-wide B operands),
which needs half the MMAs and accumulators per weight up to 8 rows; ``mixed_wg.cu`` serves
any M on Hopper's warpgroup MMA (sm_90a only; timed at first use from 9 rows), the weights
as its register operand and x in tiles of 16 to 256 rows shared by two or four warpgroups. All
three read the same packed words, and each is built for fp16 and for bf16 activations (x, bias
and y in that type, the MMAs on it; the salient fragments converted once per layer,
``Packed.salient_as``).

Built once by ``nvcc`` (found on PATH or under ``$CUDA_HOME``) for the GPU's own architecture
(``sm_90a`` on compute capability 9.0, where the warpgroup MMA needs it),
cached under ``$GIFT_QUANT_CACHE/kernels/`` by a digest of the source, the compiler and the
target, and called through ctypes on torch's current stream. Without a CUDA toolkit
:func:`library` returns None and the Triton kernels serve every M (``routes.route``). The
configurations a call takes (warps per block, K splits, clusters) are ``rules``'.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from gift_quant.kernels.build import cached_build, compiler_version
from gift_quant.kernels.cuda.layout import Packed
from gift_quant.kernels.cuda.rules import (
    MMA_KW,
    MMA_KW_MAX_M,
    MMV_DEPTH,
    choose,
    dependent_launch,
    mmv_choose,
    wg_choose,
)

log = logging.getLogger(__name__)

__all__ = [
    "compile_check",
    "find_nvcc",
    "library",
    "mixed_mma",
    "mixed_mmv",
    "mixed_wg",
    "wg_available",
    "wg_max_clusters",
    "wg_stream_floats",
    "wg_wave_blocks",
]

SOURCES = tuple(
    Path(__file__).with_name(n) for n in ("mixed_mma.cu", "mixed_mmv.cu", "mixed_wg.cu")
)
HEADER = Path(__file__).with_name("fragments.cuh")
_lock = threading.Lock()
_state: dict = {}


# ------------------------------------------------------------------------------------------
# build and launch


_P, _I = ctypes.c_void_p, ctypes.c_int
# the library's entry points (`extern "C"` in the sources; a test reads them there): x, codes,
# zero-points, scales, salient weights, salient indices, nsal, bias, y, workspace, counters,
# M, N, K, group, bits, bf16 (x, bias and y bf16, else fp16), then each kernel's
# configuration, pdl, stream
ENTRY_ARGS = {
    "gq_mixed_mma": [_P] * 6 + [_I] + [_P] * 4 + [_I] * 11 + [_P],  # wn, splits, csize, kw
    "gq_mixed_mmv": [_P] * 6 + [_I] + [_P] * 4 + [_I] * 11 + [_P],  # wn, splits, depth, csize
    "gq_mixed_wg": [_P] * 6 + [_I] + [_P] * 4 + [_I] * 12 + [_P, _I, _P],  # .., schedule, xs
    "gq_wg_max_clusters": [_I] * 5 + [_P],  # bits, bf16, nt, wgs, cluster; out
    "gq_wg_wave_blocks": [_I] * 4 + [_P],  # bits, bf16, nt, wgs; out
}
# the entry points of a diagnosis build only (``build_defines``: GQ_TRACE)
TRACE_ARGS = {"gq_wg_trace": [_P, _I], "gq_mma_trace": [_P, _I]}  # dst (host), count
# gq_mixed_wg's `schedule` bits (mixed_wg.cu's constants of the same names; a test compares them)
WG_STREAM_K, WG_BLOCKS_GATHER = 1, 2


def find_nvcc() -> str | None:
    """The CUDA compiler the build uses: $CUDA_HOME's (or $CUDA_PATH's), else nvcc on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def compile_check(nvcc: str, source: Path, cubin: Path) -> subprocess.CompletedProcess:
    """``source`` compiled for sm_90a into ``cubin`` with every configuration the launches may
    take (``-DGQ_COMPILE_CHECK``), ptxas's report per kernel on stderr (``-v``: registers,
    stack, spills, its advisories; ``kernels.sass.ptxas_usage`` reads it). No GPU needed."""
    return subprocess.run(
        [nvcc, "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-DGQ_COMPILE_CHECK"]
        + ["-Xptxas", "-v", "-cubin", "-o", str(cubin), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )


# the macros of a diagnosis build (``build_defines``)
DIAGNOSIS_DEFINES = {
    "GQ_TRACE": "the warpgroup kernel and the tensor-core kernel for few rows record each "
    "block's timeline (tools/trace_wg.py, tools/trace_mma.py; the swapped kernel only its "
    "split-K count, unread)",
    "GQ_NO_DEQUANT": "the warpgroup kernel uses its codes' words as the MMA fragments, "
    "undequantized: wrong results, for what the dequantization costs (tools/clock_load.py)",
}


def build_defines() -> list[str]:
    """Macros the kernels are built with for diagnosis (``GIFT_QUANT_CUDA_DEFINES``,
    comma-separated, of ``DIAGNOSIS_DEFINES``): part of the build's digest, so such a build is
    cached apart."""
    names = [d for d in os.environ.get("GIFT_QUANT_CUDA_DEFINES", "").split(",") if d]
    bad = [d for d in names if d not in DIAGNOSIS_DEFINES]
    if bad:
        raise ValueError(
            f"GIFT_QUANT_CUDA_DEFINES: unknown macro(s) {bad}; known: "
            + ", ".join(DIAGNOSIS_DEFINES)
        )
    return names


def _build(nvcc: str, arch: str) -> Path:
    """The three sources compiled side by side (each its own nvcc), then linked."""
    gencode = f"-gencode=arch=compute_{arch},code=sm_{arch}"
    defines = [f"-D{d}" for d in build_defines()]

    def obj(scratch: str, source: Path) -> str:
        return str(Path(scratch) / f"{source.stem}.o")

    return cached_build(
        "mixed_mma",
        [*(f.read_text() for f in (HEADER, *SOURCES)), compiler_version(nvcc), arch, *defines],
        lambda out, scratch: (
            [nvcc, gencode, "-shared", "-o", out] + [obj(scratch, f) for f in SOURCES]
        ),
        timeout=900,
        parts=lambda scratch: [
            [nvcc, "-O3", gencode, *defines, "-Xcompiler", "-fPIC", "-c", "-o"]
            + [obj(scratch, f), str(f)]
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
            nvcc = find_nvcc()
            if nvcc is None:
                raise RuntimeError("no nvcc on PATH or under CUDA_HOME")
            # 9.0: the arch-specific target, which the warpgroup MMA (mixed_wg.cu) needs
            arch = "90a" if (major, minor) == (9, 0) else f"{major}{minor}"
            lib = ctypes.CDLL(str(_build(nvcc, arch)))
            _state["wg"] = arch == "90a"
            if "GQ_NO_DEQUANT" in build_defines():  # never silently: its results are wrong
                print(
                    "gift_quant: GIFT_QUANT_CUDA_DEFINES=GQ_NO_DEQUANT, a diagnosis build: the "
                    "warpgroup kernel's results are wrong",
                    file=sys.stderr,
                    flush=True,
                )
            for name, args in (ENTRY_ARGS | TRACE_ARGS).items():
                if name in ENTRY_ARGS or hasattr(lib, name):
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
    if out is not None and (
        tuple(out.shape) != (M, p.N)
        or not out.is_contiguous()
        or out.data_ptr() % 16
        or out.device != x2.device
    ):  # the kernels write y in 16-byte rows of N elements
        raise ValueError(
            f"{fn.__name__}: out must be a contiguous, 16-byte aligned {M} x {p.N} tensor on "
            f"{x2.device}; got {tuple(out.shape)} on {out.device} (contiguous: "
            f"{out.is_contiguous()}, address % 16 = {out.data_ptr() % 16})"
        )
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
    kw: int = 1,
    out: Tensor | None = None,
) -> Tensor:
    """y [M, N] = x2 [M, K] @ dequant(W)^T + x2[:, S] @ W_S^T (+ bias), fp16 or bf16; ``ws``/``cnt``
    are the zeroed split-K workspace, ``wn``/``splits`` the configuration (0: ``rules.choose``);
    ``cluster`` > 1 (sm_90+, dividing the splits the launch runs, at most 16): the splits add
    up in thread-block clusters of that many blocks; ``kw`` > 1 (M <= 16; ``rules.MMA_KW``):
    that many warps share each strip, each a contiguous part of the block's k-steps, added up
    in shared memory before the split-K sum."""
    if not wn:  # the rule's configuration, without clusters
        (wn, splits), cluster, kw = choose(x2.shape[0], p.N, x2.shape[1]), 1, 1
    if kw != 1 and (x2.shape[0] > MMA_KW_MAX_M or wn not in MMA_KW.get(kw, ())):
        raise ValueError(
            f"mixed_mma: {kw} warps per strip at {wn} strips a block and M={x2.shape[0]}; "
            f"built: M <= {MMA_KW_MAX_M} with warps per strip: strips a block {MMA_KW}"
        )
    fn = _state["lib"].gq_mixed_mma
    return _launch(fn, x2, p, bias, ws, cnt, out, wn, splits, cluster, kw)


def wg_available() -> bool:
    """Whether the loaded library has the warpgroup-MMA kernel (built for sm_90a)."""
    return _state.get("lib") is not None and _state.get("wg", False)


def wg_max_clusters(nt: int, wgs: int, cluster: int) -> int:
    """How many thread-block clusters of ``cluster`` blocks of the warpgroup kernel with
    ``nt``-row tiles and ``wgs`` warpgroups the current device holds at once
    (``cudaOccupancyMaxActiveClusters``; at 4 bits, whose ring is the largest: the blocks per
    SM are the same at every width). A launch of more clusters runs them in waves. 0 where
    the query fails (logged once per configuration and device)."""
    if not wg_available():
        raise RuntimeError("the warpgroup-MMA kernel needs a build for sm_90a")
    return _max_clusters(torch.cuda.current_device(), nt, wgs, cluster)


@functools.cache
def _max_clusters(device: int, nt: int, wgs: int, cluster: int) -> int:
    out = ctypes.c_int(0)
    with torch.cuda.device(device):
        rc = _state["lib"].gq_wg_max_clusters(4, 0, nt, wgs, cluster, ctypes.byref(out))
    if rc:  # cached as 0: the counts this query would add are not timed, the rest still are
        log.warning(
            "cudaOccupancyMaxActiveClusters failed for wg:%dx%d clusters of %d on cuda:%d "
            "(error %d; -1: not a compiled configuration): those cluster counts are not timed",
            nt,
            wgs,
            cluster,
            device,
            rc,
        )
        return 0
    return out.value


def wg_wave_blocks(nt: int, wgs: int) -> int:
    """How many blocks of the warpgroup kernel with ``nt``-row tiles and ``wgs`` warpgroups the
    current device runs at once (its SMs times the blocks an SM holds, at 4 bits: the same at
    every width); 0 where the query fails."""
    if not wg_available():
        raise RuntimeError("the warpgroup-MMA kernel needs a build for sm_90a")
    return _wave_blocks(torch.cuda.current_device(), nt, wgs)


def wg_stream_floats(nt: int, wgs: int) -> int:
    """The workspace a stream-K launch of ``nt`` x ``wgs`` tiles needs on the current device:
    one partial tile (``nt`` x 64 ``wgs`` floats) per block of a wave; 0 where the wave query
    fails (such a launch is refused)."""
    return wg_wave_blocks(nt, wgs) * nt * wgs * 64


@functools.cache
def _wave_blocks(device: int, nt: int, wgs: int) -> int:
    out = ctypes.c_int(0)
    with torch.cuda.device(device):
        rc = _state["lib"].gq_wg_wave_blocks(4, 0, nt, wgs, ctypes.byref(out))
    return out.value if rc == 0 else 0


def mixed_wg(
    x2: Tensor,
    p: Packed,
    bias: Tensor | None,
    ws: Tensor,
    cnt: Tensor,
    nt: int = 0,
    wgs: int = 0,
    splits: int = 0,
    cluster: int = 1,
    tail: int = 1,
    stream_k: bool = False,
    gather: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """As :func:`mixed_mma` for any M, on the warpgroup MMA (``mixed_wg.cu``, sm_90a: see
    :func:`wg_available`): tiles of ``nt`` (16, 32, 64, 128 or 256) rows of x, ``wgs``
    warpgroups (64 output columns each) per block, ``splits`` K splits (0: ``rules.wg_choose``);
    ``cluster`` > 1 (dividing the splits the launch runs, at most 16): a tile's splits add up in
    thread-block clusters of that many blocks instead of the workspace's atomics; ``tail`` > 1
    (with one split and no cluster): the tiles past the device's last whole wave of blocks
    (:func:`wg_wave_blocks`) run as that many K splits each, added by the atomics; ``stream_k``
    (one split, no cluster or tail; 128- or 256-row tiles of two warpgroups): the tiles past the
    last whole wave but one are dealt out by k-steps over one wave of blocks, whose partial
    tiles meet in a scratch buffer of the launch's own (:func:`wg_stream_floats` floats from
    torch's caching allocator, left unzeroed: ``ws``, which the split kernels need zeroed, is
    not touched), and in ``cnt``'s flags (left zeroed). With salient columns, x's
    salient columns are gathered into a buffer of M x 64 ceil(nsal / 64) halves, which the
    kernel loads as it loads x: by a first small kernel, or (``gather``: tiles of 64 rows or
    fewer, no stream-K; where the launch's blocks are all on the GPU at once, else as before) by
    the kernel's blocks, a slice each, counted in the last two of ``cnt``'s 1 << 16 counters."""
    if not wg_available():
        raise RuntimeError("the warpgroup-MMA kernel needs a build for sm_90a")
    if not nt:
        (nt, wgs, splits), cluster = wg_choose(x2.shape[0], p.N, x2.shape[1]), 1
    flags = need = 0
    if stream_k:  # the wave queries ask the current device: x's, which the launch runs on
        with torch.cuda.device(x2.device) if x2.is_cuda else contextlib.nullcontext():
            flags, need = wg_wave_blocks(nt, wgs) * wgs * 4, wg_stream_floats(nt, wgs)
    if cnt.numel() < flags:
        raise ValueError(
            f"mixed_wg: a stream-K launch of {nt}x{wgs} tiles needs {flags} counters (a flag "
            f"per MMA warp of each block of a wave); this one has {cnt.numel()}"
        )
    if gather and (nt > 64 or stream_k):
        raise ValueError(
            f"mixed_wg: the blocks gather the salient columns themselves only in tiles of 64 "
            f"rows or fewer "
            f"without stream-K; this launch has {nt}-row tiles{' and stream-K' * stream_k}"
        )
    if gather and p.nsal and cnt.numel() < 1 << 16:
        raise ValueError(
            f"mixed_wg: a layer with salient columns needs {1 << 16} counters (the last two "
            f"count the blocks' gather); this one has {cnt.numel()}"
        )
    if stream_k:  # one partial tile per block of a wave (0 where the wave query failed: refused)
        ws = torch.empty(need, dtype=torch.float32, device=x2.device)
    xs = None  # kept alive by this frame until the launches are queued
    if p.nsal:
        xs = torch.empty(x2.shape[0], -(-p.nsal // 64) * 64, dtype=x2.dtype, device=x2.device)
    xs_ptr = None if xs is None else xs.data_ptr()
    fn = _state["lib"].gq_mixed_wg
    schedule = WG_STREAM_K * int(stream_k) | WG_BLOCKS_GATHER * int(gather)
    config = (nt, wgs, splits, cluster, tail, schedule)
    return _launch(fn, x2, p, bias, ws, cnt, out, *config, xs_ptr)
