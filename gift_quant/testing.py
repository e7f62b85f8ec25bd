"""Random mixed layers and the error bound the kernel checks use (tests, tools/check_kernels.py).

A kernel may not be worse than ``ERROR_FACTOR`` times the torch reference's own error in the
same dtype, both measured against a float64 oracle. The factor is 3, not 2: the decode GEMV
accumulates chains of 8 products in f16x2/bf16x2 registers before converting to fp32
(``triton.ptx.deqdot_asm``), where the reference accumulates in fp32 and rounds once; on the
H200 its worst case was 1.91x over 126 checked cases and 2.17x in one graph-replay test
(docs/KERNELS-NOTES.md).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from itertools import product
from pathlib import Path

import torch
from torch import Tensor

from gift_quant.quant import QuantizedWeight

__all__ = [
    "ERROR_FACTOR",
    "as_bf16",
    "as_fp16",
    "kernel_error",
    "oracle",
    "oracle_weight",
    "read_codes",
    "random_cuda_layout",
    "random_mixed_linear",
    "random_quantized",
    "run_environment",
]

ERROR_FACTOR = 3.0


def random_mixed_linear(
    in_features: int,
    out_features: int,
    *,
    bits: int,
    group_size: int = 128,
    num_salient: int = 0,
    bias: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    sym: bool = False,
):
    """A MixedLinear with random codes, zero-points, fp16 scales and salient columns (see
    ``random_quantized``)."""
    from gift_quant.mixed_linear import MixedLinear

    qw, b = random_quantized(
        in_features, out_features, bits, group_size, num_salient, bias, seed, sym
    )
    return MixedLinear.from_quantized(qw, b, dtype=dtype).to(device)


def random_quantized(
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int,
    num_salient: int,
    bias: bool,
    seed: int,
    sym: bool,
) -> tuple[QuantizedWeight, Tensor | None]:
    """Random codes, zero-points, fp16 scales and salient columns, and a bias or None.

    Salient columns hold their group's zero-point code (so they dequantize to exactly 0), as
    every quantizer of the project writes them."""
    g = torch.Generator().manual_seed(seed)
    K, N = in_features, out_features
    G = 1 if group_size == -1 else K // group_size
    gs = K if group_size == -1 else group_size
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (N, K), generator=g, dtype=torch.int32)
    if sym:
        zeros = torch.full((N, G), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(0, maxq + 1, (N, G), generator=g).float()
    scales = (torch.rand(N, G, generator=g) * 0.02 + 0.002).half().float()
    g_idx = torch.arange(K, dtype=torch.int32) // gs
    sal = torch.randperm(K, generator=g)[:num_salient].sort().values
    codes[:, sal] = zeros[:, g_idx[sal].long()].to(torch.int32)
    sal_w = torch.randn(N, num_salient, generator=g) * 0.05
    qw = QuantizedWeight(
        codes, scales, zeros, g_idx, sal, sal_w.half().float(), bits, group_size, sym
    )
    return qw, (torch.randn(N, generator=g) * 0.1) if bias else None


def random_cuda_layout(K: int, N: int, bits: int, group: int, seed: int):
    """Random codes [K, N], zero-points and fp16 scales [K / group, N] of a layer, the same
    packed into the CUDA kernels' layout (``kernels.cuda.layout.pack``, no salient columns),
    and the fp16 weights [K, N] they stand for (the reference dequantization, as float32
    numpy): ``(codes, zeros, scales, packed, weights)``."""
    from gift_quant.kernels.cuda import layout
    from gift_quant.kernels.reference import dequantize_codes

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (K, N), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (K // group, N), generator=gen, dtype=torch.int32)
    scales = (torch.rand(K // group, N, generator=gen) * 0.02 + 1e-3).half()
    p = layout.pack(codes, zeros, scales, None, None, bits, group)
    g_idx = torch.arange(K, dtype=torch.int32) // group
    ref = dequantize_codes(codes, zeros, scales, g_idx, torch.float16).float().numpy()
    return codes, zeros, scales, p, ref


def oracle(x: Tensor, layer, base_only: bool = False, weight: Tensor | None = None) -> Tensor:
    """The float64 output (salient product and bias included unless base_only), computed from
    the stored tensors by :func:`read_codes` -- not by the reference it is used to check.
    ``weight``: :func:`oracle_weight` of the layer with the same ``base_only``, read once by a
    caller that checks many inputs against one layer."""
    w = oracle_weight(layer, base_only) if weight is None else weight
    y = x.double() @ w
    if not base_only and layer.bias is not None:
        y = y + layer.bias.double()
    return y


def oracle_weight(layer, base_only: bool = False) -> Tensor:
    """The float64 weight [K, N] of :func:`oracle`: the codes read bit by bit, times their
    scales, plus (unless base_only) the salient columns added at their input rows."""
    codes = read_codes(layer.qweight, layer.bits)  # [K, N]
    zeros = read_codes(layer.qzeros.t(), layer.bits).t()  # [G, N]
    g = layer.g_idx.long()
    w = layer.scales.double()[g] * (codes - zeros[g]).double()
    if not base_only and layer.salient_idx.numel():
        w = w.index_add(0, layer.salient_idx.long(), layer.salient_weight.double().t())
    return w


def as_fp16(bits16: int):
    """The fp16 number whose bits are the low 16 of ``bits16``, as a numpy float16 (the CPU
    mirrors of the kernels' bit operations then round as fp16 arithmetic does)."""
    import numpy as np

    return np.array([bits16 & 0xFFFF], dtype=np.uint16).view(np.float16)[0]


def as_bf16(bits16: int) -> float:
    """The bf16 number whose bits are the low 16 of ``bits16`` (exact as a float)."""
    import numpy as np

    return float(np.array([(bits16 & 0xFFFF) << 16], dtype=np.uint32).view(np.float32)[0])


def read_codes(packed: Tensor, bits: int) -> Tensor:
    """Codes [K, N] read bit by bit from GPTQ-packed int32 words [K*bits/32, N].

    A second, literal reading of the layout for the oracle (the words of every 32 values form
    one little-endian stream of 32*bits bits; value j is stream bits [j*bits, (j+1)*bits)),
    independent of the unpacker in quant/packing.py."""
    R, N = packed.shape
    words = packed.to(torch.int64) & 0xFFFFFFFF
    bit = (words.unsqueeze(1) >> torch.arange(32, device=packed.device).view(1, 32, 1)) & 1
    stream = bit.reshape(R // bits, 32, bits, N)  # [word groups, value j, bit t of j, N]
    place = (2 ** torch.arange(bits, device=packed.device)).view(1, 1, bits, 1)
    return (stream * place).sum(2).reshape(R // bits * 32, N)


def kernel_error(out: Tensor, ref: Tensor, exact: Tensor) -> tuple[float, float]:
    """(max |out - exact|, max |ref - exact|); NaN in ``out`` gives an infinite error."""
    if not torch.isfinite(out).all():
        return float("inf"), float((ref.double() - exact).abs().max())
    err = float((out.double() - exact).abs().max())
    return err, float((ref.double() - exact).abs().max())


def _graph(calls: list) -> torch.cuda.CUDAGraph:
    """``calls`` (zero-argument callables) run twice on a side stream, then captured in one
    CUDA graph, replayed once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    return g


def graph_time_us(calls: list, reps: int = 15) -> float:
    """Median per-call time of ``calls`` (zero-argument callables) replayed in one graph."""
    g = _graph(calls)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del g
    return sorted(times)[len(times) // 2]


def sustained_time_us(calls: list, seconds: float, timed_half=None) -> float:
    """Per-call time of ``calls`` replayed in one graph back to back (one replay queued behind
    the one running) for ``seconds``, over the second half: by then the clock has settled where
    the board's power limit holds it under this load. ``graph_time_us`` times a few replays, a
    burst, from whatever clock the GPU had; a run of a long layer at full occupancy draws past
    the power limit within it, so two kernels timed for different lengths of burst are not
    timed alike. ``timed_half``: a context manager entered over the timed half (a sampler).
    ValueError, before any GPU work, for ``seconds`` outside (0, 600]."""
    if not 0 < seconds <= 600:
        raise ValueError(f"{seconds} s: give a window of more than 0 and at most 600 seconds")
    g = _graph(calls)
    start, prev, n, t0 = torch.cuda.Event(enable_timing=True), None, 0, time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            while time.monotonic() - t0 < seconds:
                if n == 0 and time.monotonic() - t0 > seconds / 2:  # the timed half starts
                    if prev is not None:
                        prev.synchronize()
                    if timed_half is not None:
                        stack.enter_context(timed_half)
                    start.record()
                    n = 1
                elif n:
                    n += 1
                g.replay()
                done = torch.cuda.Event(enable_timing=True)
                done.record()
                if prev is not None:
                    prev.synchronize()
                prev = done
            if n == 0:
                raise ValueError(f"{seconds} s is too short for one timed replay")
            prev.synchronize()
    finally:
        torch.cuda.synchronize()  # no replay left running, whatever happened
        del g
    return start.elapsed_time(prev) * 1e3 / (n * len(calls))


RESULTS = ":(exclude,top)benchmarks/results"  # what the tools write: not the code that ran


def caller_commit(root: Path) -> str | None:
    """GIFT_QUANT_COMMIT, the commit a copied tree was made from (a copy's own .git may lag),
    resolved to its full SHA where git knows it; None when it is unset. Refused (SystemExit,
    one line, before a tool's work) where the checkout's git shows it is wrong: a commit git
    knows whose files differ from the working tree's, or one git does not know while the
    working tree is exactly its HEAD (then HEAD is the commit to name). The whole checkout is
    compared (untracked files included), less ``benchmarks/results``."""
    caller = os.environ.get("GIFT_QUANT_COMMIT")
    if not caller:
        return None

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)

    def tree_is(commit: str) -> bool:
        same = git("diff", "--quiet", commit, "--", ":/", RESULTS).returncode == 0
        extra = git("ls-files", "--others", "--exclude-standard", "--", ":/", RESULTS)
        return same and extra.returncode == 0 and not extra.stdout.strip()

    try:
        if git("rev-parse", "--verify", "-q", "HEAD").returncode != 0:
            return caller  # not a git checkout: nothing to check against
        known = git("rev-parse", "--verify", "-q", f"{caller}^{{commit}}")
        if known.returncode == 0:
            if not tree_is(caller):
                raise SystemExit(
                    f"GIFT_QUANT_COMMIT={caller} names a commit whose files differ from this "
                    "working tree; set it to the commit the tree was made from, or unset it"
                )
            return known.stdout.strip()
        if tree_is("HEAD"):
            raise SystemExit(
                f"GIFT_QUANT_COMMIT={caller} is not a commit of this checkout, whose tree is its "
                "HEAD; unset it (HEAD is recorded) or name the commit the tree was made from"
            )
    except (OSError, subprocess.SubprocessError):
        pass
    return caller


def run_environment(shared: bool) -> dict:
    """What every JSON row of the kernel tools records: the commit, the versions, the
    processors, the GIFT_QUANT_* switches set (``GIFT_QUANT_PDL=0``, ``GIFT_QUANT_TUNE=0``, ...),
    and whether other work shared the machine during the run."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    root = Path(__file__).resolve().parent.parent
    commit = caller_commit(root)
    if commit is None:  # this checkout's own HEAD, marked when the tree differs from it
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
            ).stdout.strip()
            if subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode:
                commit += "+uncommitted changes"
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown (not a git checkout)"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return dict(
        commit=commit,
        torch=torch.__version__,
        transformers=transformers.__version__,
        triton=triton_version,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        cpu=cpu,
        switches={
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith("GIFT_QUANT_") and k not in _NOT_SWITCHES
        },
        shared=shared,
    )


# set by the device scripts or pointing at paths: not switches of the kernels' behaviour
_NOT_SWITCHES = ("GIFT_QUANT_COMMIT", "GIFT_QUANT_CACHE")


def compile_for_gpu(
    bits=(2, 3, 4),
    dtypes=("fp16", "bf16"),
    mm_configs=None,
    with_gemv: bool = True,
    rows=(16, 64, 128),
    settle: bool = True,
) -> list[str]:
    """Compile every Triton kernel for sm_90 (H100/H200) without a GPU, through Triton's own
    ptxas, and return one line per kernel with its registers, stack bytes (spills) and its
    writes to registers that MMAs may still read (``kernels.sass.unwaited_operand_writes``) where
    Triton's bundled cuobjdump can read them. Each mm configuration is compiled at each of
    ``rows`` (x rows of a launch; <= 32 rescale the accumulator per k-step) with the split-K
    epilogue (``DIRECT=False``). This catches what the interpreter cannot: code the GPU
    compiler rejects (the interpreter runs any Python) and the inline-PTX paths. The pointers
    and N, K are declared 16-divisible, as the launcher's aligned tensors and layer widths make
    them (without it the GEMV's registers read 168-255 instead of 96). Must run in a process
    where TRITON_INTERPRET is unset when the kernel modules are imported. ``with_gemv=False``
    skips the GEMV, the slowest to compile (its inline PTX); ``settle=False`` compiles the mm
    and backward loops without ``tiles.settle``, as before round 18's fix."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gift_quant.kernels.sass import (
        cuobjdump,
        resource_usage,
        unordered_workspace_zeroing,
        unwaited_operand_writes,
    )
    from gift_quant.kernels.triton import gemv, mm
    from gift_quant.kernels.triton.ptx import deqdot_asm

    if not isinstance(mm._mm_kernel, triton.runtime.JITFunction):
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1; unset it")
    target = GPUTarget("cuda", 90, 32)

    def build(kernel, types: dict, const: dict, warps: int, stages: int, maxnreg=None) -> str:
        sig = {name: types.get(name, "constexpr") for name in kernel.arg_names}
        idx = {(kernel.arg_names.index(k),): v for k, v in const.items()}
        aligned = [n for n in kernel.arg_names if n.endswith("_ptr") or n in ("N", "K")]
        attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        src = ASTSource(fn=kernel, signature=sig, constexprs=idx, attrs=attrs)
        opts = dict(num_warps=warps, num_stages=stages)
        c = triton.compile(
            src, target=target, options=opts | ({"maxnreg": maxnreg} if maxnreg else {})
        )
        shown = {k: v for k, v in const.items() if k not in ("ASM", "CONSTR")}
        cap = f", maxnreg {maxnreg}" if maxnreg else ""
        use = resource_usage(c.asm["cubin"])
        sass = cuobjdump(c.asm["cubin"], "-sass")
        if sass:
            loops, writes = unwaited_operand_writes(sass)
            use += f", {loops} MMA loops, {writes} writes to operands of MMAs not waited for"
        epilogues, unordered = unordered_workspace_zeroing(c.asm["ttgir"])
        if epilogues:
            use += f", {epilogues} split-K epilogues, {unordered} zeroing unordered"
        return f"{kernel.fn.__name__} {shown}{cap}: {len(c.asm['cubin'])} bytes of cubin{use}"

    out = []
    for b in bits:
        for dt in dtypes:
            bf16, ptr = dt == "bf16", "*bf16" if dt == "bf16" else "*fp16"
            act = dict(BITS=b, BF16=bf16, EMU=False, GROUP=128)
            i32 = {n: "i32" for n in ("M", "N", "K", "NSAL", "N_SPLIT", "N_SAL_PROGS")}
            ptrs = dict(x_ptr=ptr, y_ptr=ptr, bias_ptr=ptr, g_ptr=ptr, gx_ptr=ptr, out_ptr=ptr)
            ptrs |= dict(wst_ptr="*fp16", ws_ptr="*fp32", x32_ptr="*i32")
            ptrs |= {n: "*i32" for n in ("q_ptr", "sz_ptr", "sidx_ptr", "cnt_ptr", "sal_pos_ptr")}
            types = ptrs | i32
            for (name, spec), M in product((mm_configs or mm.MM_CONFIGS).items(), rows):
                cfg = mm.mm_config(M, 4096, 4096, 128, **spec)  # <= 32 rows: acc rescaled
                const = dict(act, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
                const |= dict(BLOCK_K=cfg["BLOCK_K"], SAL_K=64, HAS_BIAS=True, DIRECT=False)
                const |= dict(SWAP=cfg["SWAP"], SCALE_ACC=cfg["SCALE_ACC"], STAGES=3, SETTLE=settle)
                kernel = build(mm._mm_kernel, types, const, 4, 3)
                out.append(f"mm:{name} M={M} " + kernel)
            const = dict(act, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, STAGES=2, SETTLE=settle)
            out.append(build(mm._backward_kernel, types, const, 4, 2))
            for noise in (0, 1, 2):  # inference; GIFT-SW training with each noise kind
                const = dict(act, BLOCK_N=128, BLOCK_K=64, HAS_SAL=True, NOISE=noise)
                t = types | dict(delta_ptr="*fp32", seed="i64")
                out.append(build(mm._dequant_kernel, t, const, 4, 1))
            if not with_gemv:
                continue
            asm, constr = deqdot_asm(b, "bf16" if bf16 else "f16", 4)
            const = dict(act, BLOCK_M=4, BLOCK_N=128, BLOCK_K=32, EVEN_M=False, EVEN_N=True)
            const |= dict(HAS_BIAS=True, SAL_PER_PROG=64, SAL_CHUNK=32, STAGES=1, USE_ASM=True)
            # as launched on sm_90 (gemv.dependent_wait): M = 4 and M = 1 within one wave
            # waiting in the k-loop, M = 1 capped (past one wave) waiting before it
            const |= dict(ASM=asm, CONSTR=constr, PDL=True, WAIT_IN_LOOP=True)
            out.append(build(gemv._gemv_kernel, types, const, 1, 1))
            asm, constr = deqdot_asm(b, "bf16" if bf16 else "f16", 1)
            const |= dict(BLOCK_M=1, BLOCK_K=128, EVEN_M=True, ASM=asm, CONSTR=constr)
            out.append(build(gemv._gemv_kernel, types, const, 1, 1))
            const |= dict(BLOCK_K=64, WAIT_IN_LOOP=False)
            out.append(build(gemv._gemv_kernel, types, const, 1, 1, gemv.WIDE_MAXNREG))
    return out
