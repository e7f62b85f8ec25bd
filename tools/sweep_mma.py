"""Correctness and configuration sweep of the CUDA tensor-core kernel (``kernels/cuda``).

    PYTHONPATH=. python3 tools/sweep_mma.py [--shapes tuned|held_out|all|small] [--shape NxK ...]
        [--ms 1,2,...]
        [--bits 4,3,2] [--kernel mma|mmv] [--configs auto|all] [--out DIR] [--name FILE]
        [--shared] [--no-salient] [--cluster]

For every shape, bit width and M: the kernel's result against a float64 oracle (relative error,
and the max error against the fp16 reference's own), then the per-call time of cuBLAS fp16, of
the op as routed now (``torch.ops.gift_quant.mixed_matmul``), of the GEMV where M is small
enough for it (the route between the two is chosen from these rows) and of the CUDA kernel in its
automatic configuration (``--configs all``: also every (warps, splits) variant; ``--kernel
mmv``: the swapped kernel for M <= 16, its configurations at every depth), with the
protocol of ``bench_kernels.py`` (CUDA graph over > 1.5 GB of layer copies, median replay).
``--cluster`` (mmv, sm_90): also each configuration of the default depth with its splits
summed in thread-block clusters (the largest of 16, 8, 4, 2 blocks dividing its splits), and
8 and 16 splits each in one cluster.
Rows go to ``--name`` (``sweep_mma_<gpu>.json``) with the run environment; a table is printed.
``--no-salient`` (a diagnostic: what the salient columns cost) also times, in the same graphs,
the CUDA kernel and the GEMV on the same layers with the salient columns left out, checked
against the oracle without them (``nosal_*`` fields).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import (  # noqa: E402
    GROUP,
    GROUPS,
    cand_call,
    floor_us,
    layer_bytes,
    op_route,
    ours,
    reference,
    rotated_copies,
    run_config,
    time_cublas,
)
from kernel_tables import parse_shape  # noqa: E402
from provenance import gpu_tag  # noqa: E402

from gift_quant.kernels.cuda import native, rules  # noqa: E402
from gift_quant.kernels.reference import dequantize_codes  # noqa: E402
from gift_quant.kernels.triton import dispatch, routes  # noqa: E402
from gift_quant.kernels.triton.gemv import gemv_config  # noqa: E402
from gift_quant.testing import graph_time_us, run_environment  # noqa: E402

SHAPES = {
    "tuned": GROUPS["tuned"],
    "held_out": GROUPS["held_out"],
    "all": GROUPS["tuned"] + GROUPS["held_out"],
    "small": [(4096, 4096), (28672, 4096)],
}


def configs(M: int, N: int, K: int, which: str) -> list[tuple[int, int]]:
    auto = rules.choose(M, N, K)
    if which == "auto":
        return [auto]
    out = [auto]
    strips = N // 64
    for wn in (1, 2, 4):
        if strips % wn:
            continue
        for target in (132, 264, 528, 1056):
            splits = max(1, min(K // 64, round(target / (strips // wn))))
            rows = 16 * (1 if M <= 16 else 2 if M <= 32 else 4)
            max_steps = max(1, (200 * 1024 // (2 * rows) - 8 - 128) // 64)
            splits = max(splits, -(-(K // 64) // max_steps))
            if (wn, splits) not in out:
                out.append((wn, splits))
    return out


def cluster_variants(confs: list[tuple[int, ...]], K: int) -> list[tuple[int, ...]]:
    """``confs`` (warps, splits, depth, 1) and, after them, each with the largest cluster of
    16, 8, 4 or 2 blocks that divides the splits it runs, and 8 or 16 splits in one cluster."""
    out = list(confs)
    for wn, splits, depth, _ in confs:
        if depth != rules.MMV_DEPTH:  # the kernel has clusters at its default depth only
            continue
        runs = rules._runs(K, splits)
        extra = [(wn, splits, depth, c) for c in (16, 8, 4, 2) if runs % c == 0][:1]
        extra += [(wn, s, depth, s) for s in (8, 16) if rules._runs(K, s) == s]
        out += [c for c in dict.fromkeys(extra) if c not in out]  # each configuration once
    return out


def mmv_configs(M: int, N: int, K: int, which: str) -> list[tuple[int, int, int]]:
    """(warps, splits, depth) of the swapped kernel: the rule's at every depth and the other
    configurations first use times (``rules.mmv_configs``), then (``all``) every block width
    at 1024, 2048 and 4096 warps in all, every depth."""
    wn0, sp0 = rules.mmv_choose(M, N, K)
    out = [(wn0, sp0, rules.MMV_DEPTH)]
    out += [(wn0, sp0, d) for d in rules.MMV_DEPTHS if d != rules.MMV_DEPTH]
    out += [(*c, rules.MMV_DEPTH) for c in rules.mmv_configs(M, N, K)[1:]]
    if which == "all":
        strips, steps = N // 64, K // 64
        for wn in (1, 2, 4):
            for warps in (1024, 2048, 4096):
                want = max(rules._mmv_min_splits(M, K), min(steps, round(warps / strips)))
                splits = rules._runs(K, want)
                for d in rules.MMV_DEPTHS:
                    if strips % wn == 0 and (wn, splits, d) not in out:
                        out.append((wn, splits, d))
    return out


def no_salient(x, base, copies, ccopies, ref, config, bits) -> dict:
    """The CUDA kernel in ``config`` and (M <= GEMV_MAX_M) the GEMV on the same layer copies with
    their salient columns left out: time, and the kernel's error against the oracle without them."""
    wn, splits, depth, cl = config
    M, N = x.shape[0], base["wst"].shape[1]
    ws, cnt = dispatch.workspace(x.device, M * N)
    launch = partial(native.mixed_mmv, depth=depth, cluster=cl) if depth else native.mixed_mma
    bare = [replace(P, nsal=0) for P in ccopies]
    ref0 = ref - x.double()[:, base["sidx"].long()] @ base["wst"].double()
    y = launch(x, bare[0], None, ws, cnt, wn, splits).double()
    out = dict(
        nosal_us=graph_time_us([partial(launch, x, P, None, ws, cnt, wn, splits) for P in bare]),
        nosal_rel_err=float((y - ref0).norm() / ref0.norm()),
    )
    if M <= routes.GEMV_MAX_M:  # once per layer and M, whatever the kernel's configuration
        key = (id(copies), M)
        if key not in _GEMV_NOSAL:
            cfg = gemv_config(M, N, x.shape[1], bits, GROUP)
            bare_gemv = [{**L, "wst": None, "sidx": None} for L in copies]
            _GEMV_NOSAL[key] = graph_time_us(
                [partial(run_config, x, L, bits, "", cfg) for L in bare_gemv]
            )
        out["nosal_gemv_us"] = _GEMV_NOSAL[key]
    return out


_GEMV_NOSAL: dict = {}  # (layer copies, M) -> the GEMV's time without salient columns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="tuned", choices=sorted(SHAPES))
    ap.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NxK",
        help="time this layer shape instead of --shapes (repeatable)",
    )
    ap.add_argument("--ms", default="1,2,4,8,16,32,64")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--configs", default="auto", choices=["auto", "all"])
    ap.add_argument("--kernel", default="mma", choices=["mma", "mmv"])
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--name", default=None, help="result file (default sweep_mma_<gpu>.json)")
    ap.add_argument("--shared", action="store_true")
    ap.add_argument("--no-salient", action="store_true", help="also time without the salient part")
    ap.add_argument("--cluster", action="store_true", help="also cluster-summed splits (mmv)")
    args = ap.parse_args()
    try:
        shapes = [parse_shape(t, GROUP) for t in args.shape] or SHAPES[args.shapes]
    except ValueError as exc:
        ap.error(str(exc))
    if native.library() is None:
        sys.exit("the CUDA kernel could not be built here (see the log)")
    torch.backends.cuda.matmul.allow_tf32 = False
    env = run_environment(args.shared)
    res = {"env": env, "rows": []}
    Ms = [int(m) for m in args.ms.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = gpu_tag()
    worst = 0.0
    for N, K in shapes:
        fp = {M: time_cublas(N, K, M, torch.float16) for M in Ms}
        for bits in [int(b) for b in args.bits.split(",")]:
            copies = rotated_copies(N, K, bits)
            base = copies[0]
            cbase = base["cuda"]
            ccopies = [L["cuda"] for L in copies]
            # the fp16 reference: the torch backend's dequantization, then a cuBLAS product
            g_idx = torch.arange(K, device="cuda", dtype=torch.int32) // GROUP
            w16 = dequantize_codes(base["codes"], base["z"], base["s"], g_idx, torch.float16)
            for M in Ms:
                if args.kernel == "mmv" and M > rules.MMV_MAX_M:
                    continue
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                ref = reference(x, base)
                ws, cnt = dispatch.workspace(x.device, M * N)
                ref16 = (x @ w16 + x[:, base["sidx"].long()] @ base["wst"]).double()
                t_op = graph_time_us([partial(ours, x, L, bits) for L in copies])
                # the GEMV beside it where it may serve M (the route between them is measured)
                t_gemv = None
                if M <= routes.GEMV_MAX_M:
                    t_gemv = graph_time_us([partial(cand_call, "gemv", x, L, bits) for L in copies])
                if args.kernel == "mmv":
                    confs = [(*c, 1) for c in mmv_configs(M, N, K, args.configs)]
                    if args.cluster:
                        confs = cluster_variants(confs, K)
                    auto = (*rules.mmv_choose(M, N, K), rules.MMV_DEPTH, 1)
                else:
                    confs = [(*c, 0, 1) for c in configs(M, N, K, args.configs)]
                    auto = (*rules.choose(M, N, K), 0, 1)
                for wn, splits, depth, cl in confs:
                    launch = (
                        partial(native.mixed_mmv, depth=depth, cluster=cl)
                        if depth
                        else native.mixed_mma
                    )
                    y = launch(x, cbase, None, ws, cnt, wn, splits).double()
                    rel = float((y - ref).norm() / ref.norm())
                    ratio = float(
                        (y - ref).abs().max() / (ref16 - ref).abs().max().clamp_min(1e-30)
                    )
                    worst = max(worst, ratio)
                    t = graph_time_us(
                        [partial(launch, x, P, None, ws, cnt, wn, splits) for P in ccopies]
                    )
                    nosal = (
                        no_salient(x, base, copies, ccopies, ref, (wn, splits, depth, cl), bits)
                        if args.no_salient
                        else {}
                    )
                    nb = layer_bytes(N, K, bits, M)
                    row = dict(
                        N=N,
                        K=K,
                        bits=bits,
                        M=M,
                        kernel=args.kernel,
                        wn=wn,
                        splits=splits,
                        depth=depth or None,
                        cluster=cl,
                        us=t,
                        op_us=t_op,
                        op_route=op_route(M, N, K, bits, torch.float16),
                        cublas_us=fp[M],
                        speedup=fp[M] / t,
                        op_speedup=fp[M] / t_op,
                        gemv_us=t_gemv,
                        gemv_speedup=None if t_gemv is None else fp[M] / t_gemv,
                        floor_frac=floor_us(nb) / t,
                        rel_err=rel,
                        err_ratio=ratio,
                        auto=(wn, splits, depth, cl) == auto,
                        **nosal,
                        **env,
                    )
                    res["rows"].append(row)
                    print(
                        f"{N:5d}x{K:<5d} W{bits} M={M:<3d} {args.kernel}(wn={wn},sp={splits:3d}"
                        f"{f',d={depth}' if depth else ''}{f',c={cl}' if cl > 1 else ''}) "
                        f"{t:7.2f}us x{fp[M] / t:4.2f} floor {row['floor_frac']:4.0%} | op "
                        f"{row['op_route']:8s} {t_op:7.2f}us x{fp[M] / t_op:4.2f} | cuBLAS "
                        f"{fp[M]:7.2f}us rel={rel:.1e} err/ref16={ratio:.2f}"
                        + ("" if t_gemv is None else f" | gemv x{fp[M] / t_gemv:4.2f}")
                        + (
                            f" | no salient: {nosal['nosal_us']:7.2f}us"
                            f" (rel={nosal['nosal_rel_err']:.1e})"
                            + (
                                f", gemv {nosal['nosal_gemv_us']:7.2f}us"
                                if nosal.get("nosal_gemv_us")
                                else ""
                            )
                            if args.no_salient
                            else ""
                        ),
                        flush=True,
                    )
            del copies, ccopies, base, cbase
            torch.cuda.empty_cache()
        name = args.name or f"sweep_mma_{gpu}.json"
        tmp = out / f"{name}.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out / name)
    print(f"worst max-error ratio to the fp16 reference's own: {worst:.2f}")


if __name__ == "__main__":
    main()
