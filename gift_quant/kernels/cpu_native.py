"""The CPU kernels (``cpu_gemv.c``, ``cpu_noise.c``): built once with the system C compiler into
one library, called by ctypes.

torch's own low-bit CPU kernels (``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``) are
only vectorised for some CPUs; on an AVX2 machine they were 1.9-49x slower than an fp32 matmul
(docs/KERNELS-NOTES.md). This small C file, compiled for the machine it runs on
(``-O3 -march=native -fopenmp``, GCC or Clang vector extensions), reads the 4-bit codes and
computes the whole mixed layer for a few rows in one call. Nothing here is needed to run a
model: without a compiler :func:`library` returns None and the CPU backend uses the dense path.

``cpu_noise.c`` rebuilds GIFT-SW's training weight (grid + seeded noise) in one pass, drawing
the noise from Triton's generator at the GPU kernel's offsets (:func:`noisy_weight_t`).

The shared object is cached under ``$GIFT_QUANT_CACHE/kernels/`` by a digest of the source,
the compiler and the CPU, built into a temporary sibling and renamed (concurrent builders are
safe). OpenMP comes from the ``libgomp.so.1`` torch has already loaded (same soname), so the
kernel's threads are torch's (``torch.set_num_threads``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch
from torch import Tensor

from gift_quant.kernels.build import cached_build, compiler_version
from gift_quant.quant.base import contiguous_group
from gift_quant.quant.packing import unpack_cols, unpack_rows

log = logging.getLogger(__name__)

__all__ = [
    "HalfWeight",
    "NativeLayer",
    "dequantize",
    "half_gemm",
    "half_unsupported",
    "library",
    "mixed_gemm",
    "native_unsupported",
    "noise_draws",
    "noisy_weight_t",
    "pack",
]

SOURCE = Path(__file__).with_name("cpu_gemv.c")
NOISE_SOURCE = Path(__file__).with_name("cpu_noise.c")
NOISE_KINDS = {"none": 0, "normal": 1, "uniform": 2}  # cpu_noise.c's kind argument
BLOCK_N = 16  # output columns per block (cpu_gemv.c: NB)
# Weights x rows a call must touch before it is split over torch's threads (about 0.6 ms of
# one core's work). A fork/join costs microseconds on an idle machine but milliseconds when
# other jobs hold the cores (a descheduled thread stalls the barrier): with 2 threads on 2
# shared cores, SmolLM2's 210 small decode calls took 68x as long as on one thread
# (docs/KERNELS-NOTES.md). MKL keeps such small GEMVs on one thread too.
PARALLEL_MIN_WORK = 1 << 22
_lock = threading.Lock()
_state: dict = {}


class _Layer(ctypes.Structure):
    _fields_ = [
        ("K", ctypes.c_int64),
        ("N", ctypes.c_int64),
        ("G", ctypes.c_int64),
        ("group", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("words", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("sal_w", ctypes.c_void_p),
        ("sal_idx", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
    ]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build(cc: str) -> Path:
    # -fno-math-errno: sqrtf without an errno branch, so the noise loops vectorize
    flags = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp"]
    sources = [SOURCE, NOISE_SOURCE]
    return cached_build(
        "cpu_gemv",
        [*(s.read_text() for s in sources), compiler_version(cc), _cpu_id(), platform.machine()],
        lambda out, _scratch: [cc, *flags, "-shared", "-fPIC", "-o", out, *map(str, sources)],
        timeout=300,
    )


def library():
    """The loaded kernel library, or None (no compiler, not a supported CPU, or the build failed;
    the reason is logged once). ``GIFT_QUANT_NATIVE=0`` turns it off."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib = None
        try:
            if os.environ.get("GIFT_QUANT_NATIVE", "1") == "0":
                raise RuntimeError("GIFT_QUANT_NATIVE=0")
            if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
                raise RuntimeError(f"untested CPU architecture {platform.machine()}")
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
            lib = ctypes.CDLL(str(_build(cc)))
            ptr, i64 = ctypes.c_void_p, ctypes.c_int64
            lib.gq_mixed_gemm.argtypes = [ptr, ptr, ptr, i64, ctypes.c_int]
            lib.gq_mixed_gemm.restype = ctypes.c_int
            lib.gq_dequantize.argtypes = [ptr, ptr, ctypes.c_int]
            lib.gq_dequantize.restype = None
            lib.gq_half_gemm.argtypes = [ptr, i64, i64, ptr, ptr, i64, ctypes.c_int]
            lib.gq_half_gemm.restype = None
            u64, i32 = ctypes.c_uint64, ctypes.c_int
            lib.gq_draw.argtypes = [u64, ctypes.c_uint32, i64, i32, ptr, i32]
            lib.gq_draw.restype = None
            lib.gq_noisy_weight_t.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, i32, u64, i32]
            lib.gq_noisy_weight_t.argtypes += [ptr, i32]
            lib.gq_noisy_weight_t.restype = None
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            log.info("packed CPU kernel unavailable (%s); using the dense CPU path", exc)
            lib = None
        _state["lib"] = lib
        return lib


def native_unsupported(layer) -> str | None:
    """Why the packed kernel cannot compute ``layer``, or None when it can."""
    K, N = layer.in_features, layer.out_features
    group = K if layer.group_size == -1 else layer.group_size
    if layer.bits > 4:
        return f"{layer.bits}-bit codes (the packed kernel reads 2, 3 or 4 bits)"
    if N % BLOCK_N or group % 8 or K % group:
        return f"shape {N}x{K}, group {group}: needs out % 16 == 0 and group % 8 == 0"
    if contiguous_group(layer) is None:
        return "g_idx is not contiguous groups (act-order)"
    return None


def _blocked(t: Tensor) -> Tensor:
    """[R, N] -> [N/16, R, 16] contiguous (each 16-column block's rows together)."""
    R, N = t.shape
    return t.reshape(R, N // BLOCK_N, BLOCK_N).permute(1, 0, 2).contiguous()


class NativeLayer:
    """A layer's tensors in the kernel's layout, and the struct that points at them."""

    def __init__(self, layer) -> None:
        K, N = layer.in_features, layer.out_features
        self.K, self.N = K, N
        group = K if layer.group_size == -1 else layer.group_size
        if layer.bits == 4:
            words = layer.qweight  # [K/8, N]: already 8 codes per word, row 8r+j at bits 4j
        else:  # widen 2/3-bit codes to 4 bits: the same integers
            codes = unpack_rows(layer.qweight, layer.bits).to(torch.int64).reshape(K // 8, 8, N)
            shifts = torch.arange(0, 32, 4, dtype=torch.int64).view(1, 8, 1)
            words = (codes << shifts).sum(1)
            words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        self.words = _blocked(words.to(torch.int32))
        self.zeros = _blocked(unpack_cols(layer.qzeros, layer.bits).float())
        self.scales = _blocked(layer.scales.float())
        k = layer.salient_idx.numel()
        self.sal_idx = layer.salient_idx.to(torch.int32).contiguous()
        sal = layer.salient_weight.to(torch.float16).t()  # [k, N]
        self.sal_w = _blocked(sal).view(torch.int16) if k else torch.zeros(1, dtype=torch.int16)
        self.bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
        ptrs = (self.words, self.zeros, self.scales)
        common = (K, N, K // group, group)
        self.full = _Layer(
            *common,
            k,
            *(t.data_ptr() for t in ptrs),
            self.sal_w.data_ptr(),
            self.sal_idx.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(),
        )
        self.base = _Layer(*common, 0, *(t.data_ptr() for t in ptrs), None, None, None)
        self.full_ref, self.base_ref = ctypes.byref(self.full), ctypes.byref(self.base)


def pack(layer) -> NativeLayer:
    """``layer`` in the kernel's layout (the library is built or loaded first)."""
    reason = native_unsupported(layer)
    if reason is None and library() is None:
        reason = "the packed kernel could not be built on this machine"
    if reason is not None:
        raise ValueError(f"the packed CPU kernel cannot compute this layer: {reason}")
    return NativeLayer(layer)


def mixed_gemm(x: Tensor, packed: NativeLayer, base_only: bool = False) -> Tensor:
    """x [..., K] fp32 contiguous -> [..., N] fp32: the mixed product (salient and bias in), or
    the base product alone."""
    y = torch.empty(x.shape[:-1] + (packed.N,), dtype=torch.float32)
    rows = x.numel() // packed.K
    ref = packed.base_ref if base_only else packed.full_ref
    if _state["lib"].gq_mixed_gemm(ref, x.data_ptr(), y.data_ptr(), rows, _threads(packed, rows)):
        raise MemoryError(f"the packed CPU kernel could not allocate {rows} prepared rows")
    return y


def _threads(packed: NativeLayer, rows: int) -> int:
    """torch's thread count for a call with enough work, else 1 (``PARALLEL_MIN_WORK``)."""
    passes = (rows + 3) // 4  # the kernel decodes the codes once per 4 rows
    return torch.get_num_threads() if packed.K * packed.N * passes >= PARALLEL_MIN_WORK else 1


def dequantize(packed: NativeLayer) -> Tensor:
    """``dequant(W_q)^T`` [K, N] fp32, bitwise the reference's (salient columns 0)."""
    wt = torch.empty(packed.K, packed.N, dtype=torch.float32)
    _state["lib"].gq_dequantize(packed.full_ref, wt.data_ptr(), _threads(packed, 4))
    return wt


class HalfWeight:
    """A dense weight [N, K] whose values are all fp16 values, stored as fp16 in the kernel's
    blocked layout [N/16, K, 16]."""

    def __init__(self, weight: Tensor) -> None:
        reason = half_unsupported(weight)
        if reason is not None:
            raise ValueError(f"the fp16-weight CPU kernel cannot hold this weight: {reason}")
        self.N, self.K = weight.shape
        self.blocked = _blocked(weight.detach().to(torch.float16).t()).view(torch.int16)
        self.ptr = self.blocked.data_ptr()


def half_unsupported(weight: Tensor) -> str | None:
    """Why :class:`HalfWeight` cannot hold ``weight`` exactly, or None when it can."""
    if weight.dim() != 2 or weight.shape[0] % BLOCK_N or weight.device.type != "cpu":
        return f"a {weight.device} tensor of shape {tuple(weight.shape)} (needs out % 16 == 0)"
    if not weight.dtype.is_floating_point:
        return f"dtype {weight.dtype}"
    w = weight.detach()
    if w.dtype != torch.float16 and not torch.equal(w.to(torch.float16).to(w.dtype), w):
        return "weights that are not all fp16 values (storing them as fp16 would round them)"
    if library() is None:
        return "the packed kernel could not be built on this machine"
    return None


def half_gemm(x: Tensor, half: HalfWeight) -> Tensor:
    """x [..., K] fp32 contiguous -> x @ W^T [..., N] fp32."""
    y = torch.empty(x.shape[:-1] + (half.N,), dtype=torch.float32)
    rows = x.numel() // half.K
    passes = (rows + 3) // 4
    threads = torch.get_num_threads() if half.K * half.N * passes >= PARALLEL_MIN_WORK else 1
    _state["lib"].gq_half_gemm(half.ptr, half.K, half.N, x.data_ptr(), y.data_ptr(), rows, threads)
    return y


def noise_draws(seed: int, offset: int, n: int, kind: str) -> Tensor:
    """[n] fp32 unit draws at offsets ``offset .. offset + n - 1`` of Triton's generator:
    ``tl.randn(seed, o) * 0.5`` ("normal") or ``tl.rand(seed, o) - 0.5`` ("uniform")."""
    out = torch.empty(n, dtype=torch.float32)
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU kernels could not be built on this machine")
    lib.gq_draw(
        seed & (2**64 - 1),
        offset & (2**32 - 1),
        n,
        NOISE_KINDS[kind],
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def noisy_weight_t(
    codes: Tensor,
    zeros: Tensor,
    scales: Tensor,
    group: int,
    delta: Tensor | None,
    kind: str,
    seed: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """GIFT-SW's training weight W^T [K, N] in ``dtype`` (fp32 or bf16) in one pass:
    ``scales[g] * (codes - zeros[g])`` (g = k // group) plus ``delta[n]`` times the noise
    ``kind`` drawn from ``seed`` at offset k * N + n, as the GPU kernel draws it (salient rows
    are the caller's). None where this kernel does not serve the call (the torch twin does)."""
    lib = library()
    if lib is None or dtype not in (torch.float32, torch.bfloat16) or kind not in NOISE_KINDS:
        return None
    K, N = codes.shape
    if codes.dtype != torch.uint8 or K % group or zeros.shape != (K // group, N):
        return None
    if scales.shape != zeros.shape or K * N >= 2**31:  # the GPU kernel's offsets are int32
        return None
    noisy = NOISE_KINDS[kind] != 0
    if noisy and (delta is None or delta.shape != (N,)):
        got = None if delta is None else tuple(delta.shape)
        raise ValueError(
            f"noise {kind!r} needs a per-column scale delta of shape ({N},), got {got}"
        )
    tensors = (codes, zeros, scales) + ((delta,) if noisy else ())
    if any(t.device.type != "cpu" for t in tensors):
        return None
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"noise seed {seed} is outside the 64-bit range Triton takes")
    codes, zeros = codes.contiguous(), zeros.to(torch.int32).contiguous()
    scales = scales.to(torch.float32).contiguous()
    d = delta.to(torch.float32).contiguous() if noisy else None
    wt = torch.empty(K, N, dtype=dtype)
    lib.gq_noisy_weight_t(
        codes.data_ptr(),
        zeros.data_ptr(),
        scales.data_ptr(),
        K,
        N,
        group,
        None if d is None else d.data_ptr(),
        NOISE_KINDS[kind],
        seed & (2**64 - 1),
        int(dtype == torch.bfloat16),
        wt.data_ptr(),
        torch.get_num_threads(),
    )
    return wt
