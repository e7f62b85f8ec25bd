"""Per-layer timing of the Triton dequant-matmul against cuBLAS fp16 and torch's tinygemm.

    PYTHONPATH=. python3 tools/bench_kernels.py [--out DIR] [--shapes all|tuned|held_out|small]
        [--shape NxK ...] [--ms 1,2,...] [--bits 4,3,2] [--sweep] [--warm N] [--candidates]
        [--only PREFIX,...] [--skip-tinygemm] [--budget S] [--shared] [--dtype fp16|bf16]
        [--sustained SECONDS]
    python3 tools/bench_kernels.py --markdown benchmarks/results/kernels_h200.json
    python3 tools/bench_kernels.py --compare BASE.json NEW.json

Protocol: every timed callable is captured R times in one CUDA graph, each time on its own copy
of the layer (R * bytes >= 1.5 GB, so L2 does not hold the weights), and the per-call time is
the median graph replay divided by R (a burst of a few replays). With ``--sustained S`` the op's,
cuBLAS's and tinygemm's graphs are instead replayed back to back for S seconds and the second
half timed: the clock then sits where the board's power limit holds it under that load (a large
layer at M = 256-512 draws past the limit within a burst, and cuBLAS's bursts are shorter than
ours: its copies are fewer), so each is timed alike in steady state; rows record the protocol,
and where NVML loads, the board's clock, power and clock-event reasons over the timed half
(``power`` for ours, ``cublas_power``; ``nvml_power.summary``).
cuBLAS fp16 (``torch.matmul``), tinygemm (``torch.ops.aten._weight_int4pack_mm``, 4-bit, bf16,
g128) and ours (``torch.ops.gift_quant.mixed_matmul``: 2/3/4 bits, g128, 128 salient columns
fused) are timed in the same process. "floor" is 2.0 us + bytes / 4.62 TB/s (launch latency
plus the bytes at the H200's measured copy bandwidth); the table prints speedup over cuBLAS and
the fraction of that floor reached.

Two shape groups, reported apart: "tuned" (the shapes the route tables were measured on) and
"held_out" (13B/70B-like shapes no route was chosen on: do the routes generalise?).
``--sweep`` also times alternative GEMV configurations and dequantize + cuBLAS; ``--warm N``
compiles every kernel in N worker processes first. ``--candidates`` also times, for every M >
4 (every M where the CUDA kernels are built), each kernel of ``routes.candidates(M)`` (rows
under "cand": what the route tables are made from), until ``--budget`` seconds have passed.
``--dtype bf16`` times bf16 activations against cuBLAS bf16 (bf16 models; the same kernels,
their bf16 builds, chosen by their own first-use timing).
Every JSON row records the commit, the versions, the GPU and CPU, whether the machine was
shared (``--shared``), the activation dtype and the routes in force.
Results: ``kernels_<gpu>.json`` (``kernels_<gpu>_bf16.json`` with bf16; <gpu> the GPU's tag,
h200 or h100) under ``--out`` (default benchmarks/results); ``--markdown FILE`` prints a saved
run's tables (as in the README) and counts the targets on it (``kernel_tables.py``); ``--compare
BASE NEW`` prints the time ratios of two saved runs: the routed op and cuBLAS per M, each
candidate configuration (the same one in both builds, with ``--candidates``) and each cell's
fastest candidate, then the routed W4 speed-ups side by side and the cells below the targets'
floors in each run; ``--k-sweep FILE`` splits each candidate's time in a run over shapes that
differ only in K (``--shape NxK`` repeated) into a fixed part and a part per 64 columns of K.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv_variants import gemv_variants  # noqa: E402
from kernel_tables import parse_shape, print_tables, show_saved  # noqa: E402
from nvml_power import Nvml, Sampler, summary  # noqa: E402
from provenance import gpu_tag  # noqa: E402

from gift_quant.kernels import ACTIVATION_DTYPES  # noqa: E402
from gift_quant.kernels.cuda import layout, native  # noqa: E402
from gift_quant.kernels.triton import dispatch, routes, tuning  # noqa: E402
from gift_quant.kernels.triton import ops as _ops  # noqa: E402, F401 (registers the custom ops)
from gift_quant.kernels.triton.gemv import TUNED_M as GEMV_TUNED_M  # noqa: E402
from gift_quant.kernels.triton.gemv import gemv  # noqa: E402
from gift_quant.kernels.triton.mm import dequantize  # noqa: E402
from gift_quant.kernels.triton.ptx import pack_3bit  # noqa: E402
from gift_quant.quant.packing import pack_rows  # noqa: E402
from gift_quant.testing import graph_time_us, run_environment, sustained_time_us  # noqa: E402

GROUPS = {  # (N, K)
    "tuned": [(4096, 4096), (12288, 4096), (28672, 4096), (4096, 14336)],
    "held_out": [(5120, 5120), (13824, 5120), (5120, 13824), (8192, 28672)],
}
SHAPES = {
    "all": [(g, s) for g in GROUPS for s in GROUPS[g]],
    "tuned": [("tuned", s) for s in GROUPS["tuned"]],
    "held_out": [("held_out", s) for s in GROUPS["held_out"]],
    "small": [("tuned", (4096, 4096)), ("tuned", (28672, 4096))],
}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
BITS = [4, 3, 2]
SWEEP_MS = (1, 2, 4, 8, 16, 32, 64, 128)
GROUP, NSAL, TARGET_BYTES = 128, 128, 1.5e9
SUSTAINED = 0.0  # seconds of back-to-back replays per timing (--sustained); 0: a burst
POWER: Nvml | None = None  # read over each sustained timing's timed half, where NVML loads
OP = torch.ops.gift_quant.mixed_matmul


def time_calls(calls: list) -> float:
    """Per-call time of ``calls`` under the run's protocol: a burst (``graph_time_us``) or,
    with ``--sustained``, steady state (``sustained_time_us``)."""
    return sustained_time_us(calls, SUSTAINED) if SUSTAINED else graph_time_us(calls)


def time_with_power(calls: list) -> tuple[float, dict | None]:
    """``time_calls``' time and, in steady state where NVML loaded (``POWER``), the board's
    clock, power and clock-event reasons over the timed half (``nvml_power.summary``)."""
    if not SUSTAINED or POWER is None:
        return time_calls(calls), None
    sampler = Sampler(POWER)
    us = sustained_time_us(calls, SUSTAINED, timed_half=sampler)
    return us, summary(sampler.samples)


def packed_layer(N: int, K: int, bits: int, codes: bool) -> dict:
    """Kernel-layout tensors of a random layer (real codes if ``codes``, else random words)."""
    dev = "cuda"
    G = K // GROUP
    s = (torch.rand(G, N, device=dev) * 0.02 + 0.002).half()
    z = torch.randint(0, 2**bits, (G, N), device=dev, dtype=torch.int32)
    sz = (s.view(torch.int16).to(torch.int32) & 0xFFFF) | (z << 16)
    wst = (torch.randn(NSAL, N, device=dev) * 0.05).half()
    sidx = torch.randperm(K, device=dev)[:NSAL].sort().values.to(torch.int32)
    sal_pos = torch.full((K,), -1, dtype=torch.int32, device=dev)
    sal_pos[sidx.long()] = torch.arange(NSAL, dtype=torch.int32, device=dev)
    c = None
    if codes:  # salient codes at the zero-point, as the quantizers write them
        c = torch.randint(0, 2**bits, (K, N), device=dev, dtype=torch.int32)
        c[sidx.long()] = z.repeat_interleave(GROUP, 0)[sidx.long()]
        q = pack_3bit(c) if bits == 3 else pack_rows(c, bits)
    else:
        q = torch.randint(-(2**31), 2**31 - 1, (K * bits // 32, N), device=dev, dtype=torch.int32)
    cuda = None
    if native.library() is not None:  # the CUDA kernel's layout (random words for copies)
        if codes:
            cuda = layout.pack(c, z, s, wst, sidx, bits, GROUP)
        else:
            shape = (K // 64, N // 64, bits, 32, 4)
            cq = torch.randint(-(2**31), 2**31 - 1, shape, device=dev, dtype=torch.int32)
            czp, csc, cws = layout.pack_zeros(z), layout.pack_scales(s), layout.pack_salient(wst)
            cuda = layout.Packed(cq, czp, csc, cws, sidx, NSAL, bits, GROUP, K, N)
    # the kernels launch as programmatic dependents on sm_90 and read their weights before they
    # wait for the kernel before them: the kernels that wrote these must be done (ops._settle)
    torch.cuda.synchronize()
    return dict(q=q, sz=sz, wst=wst, sidx=sidx, sal_pos=sal_pos, codes=c, s=s, z=z, cuda=cuda)


def rotated_copies(N: int, K: int, bits: int) -> list[dict]:
    """The layer (real codes), then copies of random words past TARGET_BYTES (8-192 in all)."""
    R = min(192, max(8, math.ceil(TARGET_BYTES / layer_bytes(N, K, bits, 1))))
    return [packed_layer(N, K, bits, codes=i == 0) for i in range(R)]


def reference(x: torch.Tensor, L: dict) -> torch.Tensor:
    w = (L["codes"] - L["z"].repeat_interleave(GROUP, 0)).double()
    w = w * L["s"].double().repeat_interleave(GROUP, 0)
    return x.double() @ w + x.double()[:, L["sidx"].long()] @ L["wst"].double()


def layer_bytes(N: int, K: int, bits: int, M: int) -> int:
    return K * N * bits // 8 + (K // GROUP) * N * 4 + NSAL * (2 * N + 4) + 2 * M * (K + N)


def floor_us(nbytes: float) -> float:
    return 2.0 + nbytes / 4.62e6


def ours(x: torch.Tensor, L: dict, bits: int):
    c = L["cuda"]
    cuda = (c.qc, c.zp, c.scp, c.salient_as(x.dtype)) if c is not None else (None,) * 4
    return OP(x, L["q"], L["sz"], L["wst"], L["sidx"], L["sal_pos"], None, bits, GROUP, *cuda)


def op_route(M: int, N: int, K: int, bits: int, dtype: torch.dtype) -> str:
    """The kernel the op takes for x of ``dtype`` now (the CUDA kernel where it is built, in
    the configuration measured at the shape's first call)."""
    mma = native.library() is not None
    return routes.route_in_force(
        M, N, K, bits, GROUP, NSAL, mma, wg=native.wg_available(), dtype=dtype
    )


def cublas_calls(x: torch.Tensor, N: int) -> list:
    """cuBLAS (``torch.matmul``) on x's type over weight copies [N, K] past TARGET_BYTES, each
    into its own output: the callables the bench times against ours."""
    M, K = x.shape
    R = min(256, max(8, math.ceil(TARGET_BYTES / (2 * N * K))))
    ws = [torch.randn(N, K, device="cuda", dtype=x.dtype) for _ in range(R)]
    ys = [torch.empty(M, N, device="cuda", dtype=x.dtype) for _ in range(R)]
    return [partial(torch.matmul, x, w.t(), out=y) for w, y in zip(ws, ys, strict=True)]


def time_cublas(N: int, K: int, M: int, dtype: torch.dtype) -> float:
    return time_calls(cublas_calls(torch.randn(M, K, device="cuda", dtype=dtype), N))


def time_tinygemm(N: int, K: int, Ms: list[int]) -> dict:
    """tinygemm (bf16 activations, 4-bit, g128); {} if this torch build lacks it."""
    R = min(256, max(8, math.ceil(TARGET_BYTES / (N * K // 2))))
    try:
        pack = []
        for _ in range(R):
            w = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8)
            wp = torch.ops.aten._convert_weight_to_int4pack(w, 8)
            sz = (torch.rand(K // GROUP, N, 2, device="cuda") * 0.02).to(torch.bfloat16)
            pack.append((wp, sz))
        out = {}
        for M in Ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            fn = torch.ops.aten._weight_int4pack_mm
            out[M] = time_calls([partial(fn, x, wp, GROUP, sz) for wp, sz in pack])
        return out
    except Exception as exc:  # noqa: BLE001 - report and go on without the peer
        print(f"tinygemm unavailable: {exc!r}"[:300], flush=True)
        return {}


def run_config(x: torch.Tensor, L: dict, bits: int, name: str, cfg: dict):
    ws, cnt = dispatch.workspace(x.device, x.shape[0] * L["sz"].shape[1])
    return gemv(
        x, L["q"], L["sz"], L["wst"], L["sidx"], None, ws, cnt, bits=bits, group=GROUP, config=cfg
    )


def record(res: dict, key: str, **fields) -> dict:
    """Append a row to ``res[key]`` with the run's environment (commit, versions, GPU/CPU,
    shared, activation dtype) in it; ``fields`` may name their own dtype (tinygemm: bf16)."""
    row = {**res["row_env"], **fields}
    res[key].append(row)
    return row


def routes_in_force(N: int, K: int, bits: int, dtype: torch.dtype) -> dict:
    """The kernel the op took at every benchmarked M (after the shape ran: the CUDA kernel's
    configurations measured at first use included), and where the Triton table came from."""
    measured = (N, K, bits) in routes.ROUTES
    return dict(
        table="ROUTES (measured on this shape)" if measured else "DEFAULT_ROUTES",
        tuned_m=list(routes.TUNE_M),
        wg_m=list(routes.WG_M),
        by_m={M: op_route(M, N, K, bits, dtype) for M in MS},
    )


def bench_shape(group: str, N: int, K: int, sweep: bool, res: dict) -> None:
    dtype = ACTIVATION_DTYPES[res["row_env"]["dtype"]]
    fp_power = {
        M: time_with_power(cublas_calls(torch.randn(M, K, device="cuda", dtype=dtype), N))
        for M in MS
    }
    fp = {M: us for M, (us, _) in fp_power.items()}
    tg = {} if res["opts"]["skip_tinygemm"] else time_tinygemm(N, K, MS)
    for bits in BITS:
        copies = rotated_copies(N, K, bits)
        base = copies[0]
        shape_rows = []
        for M in MS:
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            rel = float(
                (ours(x, base, bits).double() - reference(x, base)).norm()
                / reference(x, base).norm()
            )
            t, power = time_with_power([partial(ours, x, L, bits) for L in copies])
            nb = layer_bytes(N, K, bits, M)
            row = record(
                res,
                "rows",
                shape_group=group,
                N=N,
                K=K,
                bits=bits,
                M=M,
                route=op_route(M, N, K, bits, dtype),
                us=t,
                cublas_us=fp[M],
                speedup=fp[M] / t,
                floor_us=floor_us(nb),
                floor_frac=floor_us(nb) / t,
                GBps=nb / t / 1e3,
                rel_err=rel,
                tinygemm_us=tg.get(M) if bits == 4 else None,
            )
            if power:  # steady state: the board over the timed half, ours and cuBLAS's
                row.update(power=power, cublas_power=fp_power[M][1])
            shape_rows.append(row)
            tgs = f" tinygemm {tg[M]:6.2f}us x{fp[M] / tg[M]:4.2f}" if bits == 4 and M in tg else ""
            if power:
                tgs += f"  {power['watts']:.0f} W {power['mhz_median']:.0f} MHz {power['reasons']}"
            print(
                f"{N:5d}x{K:<5d} W{bits} M={M:<3d} {row['route']:6s} ours {t:7.2f}us "
                f"x{fp[M] / t:4.2f} vs cuBLAS {fp[M]:7.2f}us  floor {row['floor_frac']:4.0%}"
                f"{tgs}  rel={rel:.1e}",
                flush=True,
            )
            if sweep and M in SWEEP_MS and (bits == 4 or M == 1):
                sweep_one(x, copies, bits, M, N, K, fp[M], res)
            # a choice to time: the route tables' M, the CUDA kernels', the GEMV's configurations
            if res["opts"]["candidates"] and (
                M > routes.GEMV_MAX_M or copies[0]["cuda"] or M <= GEMV_TUNED_M
            ):
                time_candidates(x, copies, bits, M, N, K, fp[M], res)
        for row in shape_rows:
            row["routes_in_force"] = routes_in_force(N, K, bits, dtype)
        del copies, base
        torch.cuda.empty_cache()
    record(res, "cublas", shape_group=group, N=N, K=K, us=fp)
    if tg:
        record(res, "tinygemm", shape_group=group, N=N, K=K, dtype="bf16", us=tg)


def cand_call(name: str, x: torch.Tensor, L: dict, bits: int):
    return dispatch.run_route(
        name,
        x,
        L["q"],
        L["sz"],
        L["wst"],
        L["sidx"],
        L["sal_pos"],
        None,
        bits,
        GROUP,
        cuda=L["cuda"],
    )


def time_candidates(x, copies, bits, M, N, K, fp_us, res) -> None:
    """Every candidate, the CUDA kernel in each configuration the first-use timing may pick
    included, timed like the op (graph over rotated copies): the op's own time against the
    best of these says how well its first-use timing chose."""
    mma = copies[0]["cuda"] is not None
    wg = mma and native.wg_available()
    only = res["opts"]["only"]
    for name in routes.candidates(M, mma=mma, N=N, K=K, wg=wg):
        if only and not name.startswith(tuple(only)):
            continue
        if time.time() - res["opts"]["t0"] > res["opts"]["budget"]:
            print("    (budget spent: no more candidates)", flush=True)
            return
        try:
            t = graph_time_us([partial(cand_call, name, x, L, bits) for L in copies], reps=9)
        except Exception as exc:  # noqa: BLE001 - a kernel that does not compile or fit
            print(f"    cand {name}: {exc!r}"[:300], flush=True)
            continue
        record(res, "cand", N=N, K=K, bits=bits, M=M, name=name, us=t, cublas_us=fp_us)
        print(f"    cand {name:10s} {t:8.2f}us x{fp_us / t:4.2f}", flush=True)


def sweep_one(x, copies, bits, M, N, K, fp_us, res) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, cfg in gemv_variants(M, N, K, bits, GROUP, NSAL, sms):
        try:
            t = graph_time_us([partial(run_config, x, L, bits, name, cfg) for L in copies], reps=9)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit
            print(f"    sweep {name}: {exc!r}"[:200], flush=True)
            continue
        record(res, "sweep", N=N, K=K, bits=bits, M=M, name=name, cfg=cfg, us=t)
        print(f"    sweep {name:18s} {t:7.2f}us x{fp_us / t:4.2f} {cfg}", flush=True)
    if M >= 32:  # dequantize + cuBLAS, whatever the route
        L0 = copies[0]

        def deq_mm(L):
            w = dequantize(
                L["q"], L["sz"], L["wst"], L["sal_pos"], K, bits=bits, group=GROUP, dtype=x.dtype
            )
            return x @ w

        t = graph_time_us([lambda L=L: deq_mm(L) for L in copies], reps=9)
        err = float((deq_mm(L0).double() - reference(x, L0)).norm() / reference(x, L0).norm())
        record(res, "sweep", N=N, K=K, bits=bits, M=M, name="dequant+cublas", us=t)
        print(f"    sweep dequant+cublas   {t:7.2f}us x{fp_us / t:4.2f} rel={err:.1e}", flush=True)


def _warm_case(args) -> str:
    N, K, bits, Ms, cand, dtype = args
    L = packed_layer(N, K, bits, codes=False)
    for M in Ms:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        ours(x, L, bits)
        if cand and M > routes.GEMV_MAX_M:
            for name in routes.candidates(M):
                cand_call(name, x, L, bits)
    torch.cuda.synchronize()
    return f"{N}x{K} W{bits}"


def warm(shapes, workers: int, cand: bool, dtype: torch.dtype) -> None:
    """Compile every (shape, bits, M) kernel in worker processes (fills Triton's disk cache)."""
    t0 = time.time()
    cases = [(N, K, b, [M], cand, dtype) for _, (N, K) in shapes for b in BITS for M in MS]
    with mp.get_context("spawn").Pool(workers) as pool:
        for done in pool.imap_unordered(_warm_case, cases):
            print(f"  warm {done} ({time.time() - t0:.0f}s)", flush=True)


def profile(spec: str, dtype: torch.dtype) -> None:
    """``N,K,bits,M[,kernel]``: call the op (or the candidate ``kernel``, e.g. "gemv" or
    "mmv:4x3") 40 times on one layer (for ``ncu --clock-control none``)."""
    parts = spec.split(",")
    N, K, bits, M = map(int, parts[:4])
    name = parts[4] if len(parts) > 4 else ""
    L = packed_layer(N, K, bits, codes=False)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    for _ in range(40):
        cand_call(name, x, L, bits) if name else ours(x, L, bits)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--shapes", default="all", choices=sorted(SHAPES))
    ap.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NxK",
        help="time this layer shape instead of --shapes (repeatable; group 'custom')",
    )
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--warm", type=int, default=0)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument(
        "--profile", default=None, help="N,K,bits,M[,KERNEL]: only run the op or KERNEL (for ncu)"
    )
    ap.add_argument("--candidates", action="store_true")
    ap.add_argument(
        "--only", default="", help="with --candidates: only names starting with these (a,b,...)"
    )
    ap.add_argument("--bits", default=",".join(map(str, BITS)), help="bit widths (4,3,2)")
    ap.add_argument("--skip-tinygemm", action="store_true")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds for candidate timing")
    ap.add_argument("--shared", action="store_true", help="other work ran on the machine")
    ap.add_argument(
        "--dtype", default="fp16", choices=sorted(ACTIVATION_DTYPES), help="activations"
    )
    ap.add_argument(
        "--name", help="result file under --out (kernels_<gpu>.json, kernels_<gpu>_bf16.json)"
    )
    ap.add_argument("--markdown", default=None, help="JSON of a run: print its tables, run none")
    ap.add_argument(
        "--compare",
        nargs=2,
        metavar=("BASE", "NEW"),
        help="JSON of two runs: time ratios, speed-ups side by side",
    )
    ap.add_argument("--k-sweep", metavar="FILE", help="JSON of a run over K: fixed, per-step times")
    ap.add_argument(
        "--sustained",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="time ours, cuBLAS and tinygemm in steady state: back-to-back replays for SECONDS, "
        "the second half timed (0: the burst protocol)",
    )
    args = ap.parse_args()
    if args.sustained and not 0.1 <= args.sustained <= 600:
        ap.error(f"--sustained {args.sustained}: give 0.1 to 600 seconds (or 0 for a burst)")
    if args.sustained and (args.candidates or args.sweep):
        ap.error(
            "--sustained times the op, cuBLAS and tinygemm only: run --candidates / --sweep "
            "without it (their configurations are timed as bursts)"
        )
    try:
        shapes = [("custom", parse_shape(t, GROUP)) for t in args.shape] or SHAPES[args.shapes]
    except ValueError as exc:
        ap.error(str(exc))
    if args.profile:
        return profile(args.profile, ACTIVATION_DTYPES[args.dtype])
    if show_saved(args.markdown, args.compare, args.k_sweep):
        return None
    MS[:] = [int(m) for m in args.ms.split(",")]
    BITS[:] = [int(b) for b in args.bits.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = False
    p = torch.cuda.get_device_properties(0)
    global SUSTAINED, POWER
    SUSTAINED = args.sustained
    if SUSTAINED:
        try:
            POWER = Nvml(f"GPU-{p.uuid}")
        except SystemExit as exc:  # a machine without NVML: times only
            print(f"no power readings: {exc}", flush=True)
    protocol = f"sustained {SUSTAINED:g} s" if SUSTAINED else "burst"
    row_env = dict(run_environment(args.shared), dtype=args.dtype, protocol=protocol)
    res = dict(
        row_env=row_env,
        env=dict(
            **row_env,
            sms=p.multi_processor_count,
            gemv_max_m=routes.GEMV_MAX_M,
            cublas_min_m=routes.CUBLAS_MIN_M,
            default_routes=routes.DEFAULT_ROUTES,
            routes={str(k): v for k, v in routes.ROUTES.items()},
        ),
        rows=[],
        cublas=[],
        tinygemm=[],
        sweep=[],
        cand=[],
        opts=dict(
            candidates=args.candidates,
            only=[o for o in args.only.split(",") if o],
            skip_tinygemm=args.skip_tinygemm,
            budget=args.budget,
            t0=time.time(),
        ),
    )
    print(res["env"], flush=True)
    if args.warm:
        warm(shapes, args.warm, args.candidates, ACTIVATION_DTYPES[args.dtype])
    name = args.name or f"kernels_{gpu_tag()}" + ("" if args.dtype == "fp16" else "_bf16") + ".json"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for group, (N, K) in shapes:
        bench_shape(group, N, K, args.sweep, res)
        res["tuning"] = tuning.record()  # what the op measured at first use
        tmp = out / (name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out / name)
    print_tables(res)


if __name__ == "__main__":
    main()
