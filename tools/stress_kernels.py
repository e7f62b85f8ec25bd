"""Repeated calls of the split-K kernels on the GPU: races show up here, not in one call.

    PYTHONPATH=. python3 tools/stress_kernels.py [--iters 200] [--cuda] [--out DIR] [--shared]
                                                 [--resume FILE]

Every ``mm`` configuration at M = 16, 40 and 64 and the GEMV at M = 1 and 4, for 2/3/4 bits x
fp16/bf16 on a 4096x4096 layer (group 128, 128 salient columns; with ``--cuda`` also every
configuration of the CUDA kernels that the first-use timing may pick, at M = 2, 8, 16, 32, 64
and 200): ``--iters`` inputs (fresh random x), each called twice; both calls checked
against the float64 oracle (max |out - exact| <= 3 x max |ref - exact|, ref the torch
reference in the same dtype; a NaN is an infinite error) and against each other (split-K sums
in another order differ by rounding; two calls that differ by more than 4 x the reference's
error, or in a NaN, count as nondeterministic).
check_kernels.py tests each kernel once; a kernel wrong in one call of six passes there five
times in six. Prints a table; writes stress_kernels.json under --out (rows with the commit,
versions, GPU and whether the machine was shared; rewritten after every case, so a run cut short
keeps what it measured; ``--resume`` an earlier run's JSON keeps its rows of the same commit and
--iters and runs only the cases it lacks, each case's inputs seeded from the case itself; a row
lists up to 3 wrong calls: how many elements are off, how many of them read NaN or exactly 0,
their rows and 64-column blocks); exit status 1 when any call was wrong or nondeterministic.
About 2 s per case at --iters 60 once the kernels are compiled (the first runs, at 8482523,
checked only the first call of each pair against the oracle).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gift_quant.kernels import ACTIVATION_DTYPES, reference  # noqa: E402
from gift_quant.kernels.cuda import native  # noqa: E402
from gift_quant.kernels.triton import dispatch as triton_dispatch  # noqa: E402
from gift_quant.kernels.triton import ops as triton_ops  # noqa: E402
from gift_quant.kernels.triton import routes  # noqa: E402
from gift_quant.kernels.triton.mm import MM_CONFIGS  # noqa: E402
from gift_quant.testing import (  # noqa: E402
    ERROR_FACTOR,
    kernel_error,
    oracle,
    oracle_weight,
    random_mixed_linear,
    run_environment,
)

CASES = [(M, f"mm:{name}") for M in (16, 40, 64) for name in MM_CONFIGS]
CASES += [(1, "gemv"), (4, "gemv")]
CUDA_MS = (2, 8, 16, 32, 64, 200)  # --cuda: every CUDA-kernel configuration at these M


def cases(layer, cuda: bool) -> list[tuple[int, str]]:
    """CASES, and with ``cuda`` (where the CUDA kernels are built) every configuration of the
    CUDA kernels that the first-use timing may pick for this layer."""
    out = list(CASES)
    if cuda and triton_ops.cuda_layout(layer) is not None:
        N, K = layer.out_features, layer.in_features
        wg = native.wg_available()
        for M in CUDA_MS:
            names = routes.candidates(M, mma=True, N=N, K=K, wg=wg)
            out += [(M, n) for n in names if n.startswith(("mma:", "mmv:", "wg:"))]
    return out


def weights(layer, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's float64 oracle weight and its reference weight in ``dtype`` (the torch
    reference's dequantization), read once per layer instead of on every call."""
    ref = reference.dequantize_weight(
        layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, dtype
    )
    return oracle_weight(layer), ref


def stress(layer, w, M: int, name: str, iters: int, seed: int) -> dict:
    """``iters`` inputs through kernel ``name``, each called twice; ``w``: :func:`weights`."""
    p = triton_ops.prepare(layer)
    K = layer.in_features
    args = (p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
    exact_w, ref_w = w
    gen = torch.Generator(device="cuda").manual_seed(seed)  # per case: a resumed run's inputs
    wrong = nondet = 0
    examples: list[dict] = []
    worst = 0.0
    for _ in range(iters):
        x = torch.randn(M, K, device="cuda", dtype=ref_w.dtype, generator=gen)
        exact = oracle(x, layer, weight=exact_w)
        ref = reference.add_salient_and_bias(x, x @ ref_w, layer)  # reference.dequant_matmul
        y1 = triton_dispatch.run_route(name, x, *args, cuda=p.cuda)
        y2 = triton_dispatch.run_route(name, x, *args, cuda=p.cuda)
        for y in (y1, y2):  # both calls against the oracle (a NaN reads as an infinite error)
            err, ref_err = kernel_error(y, ref, exact)
            worst = max(worst, err / max(ref_err, 1e-12))
            bound = ERROR_FACTOR * ref_err + 1e-6
            if not err <= bound:
                wrong += 1
                if len(examples) < 3:
                    examples.append(how_wrong(y, exact, bound))
        gap = float((y1.float() - y2.float()).abs().max())
        nondet += not gap <= 4 * ref_err  # NaN in either counts
    calls = 2 * iters
    worst = round(worst, 3) if math.isfinite(worst) else "inf"  # JSON has no infinity
    return dict(
        M=M, route=name, calls=calls, wrong=wrong, nondet=nondet, worst=worst, examples=examples
    )


ROW_KEYS = {"bits", "dtype", "M", "route", "calls", "wrong", "nondet", "commit"}


def case_seed(bits: int, dtype: str, M: int, route: str) -> int:
    """The inputs' seed of one case: the same whether or not the run was resumed."""
    return zlib.crc32(f"{bits} {dtype} {M} {route}".encode())


def earlier_rows(path: Path, commit: str, calls: int) -> list[dict]:
    """The rows of an earlier run's JSON measured at ``commit`` with ``calls`` calls per case
    (--resume, the same --iters); exits with a one-line error where the file is not a
    stress_kernels.json."""
    try:
        earlier = json.loads(path.read_text())["rows"]
        if not isinstance(earlier, list) or not all(
            isinstance(r, dict) and ROW_KEYS <= r.keys() for r in earlier
        ):
            raise ValueError(f"rows must be objects with {', '.join(sorted(ROW_KEYS))}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"error: --resume {path}: not a stress_kernels.json ({type(e).__name__}: {e})")
    rows = [r for r in earlier if r["commit"] == commit and r["calls"] == calls]
    print(f"resumed {len(rows)} of {len(earlier)} rows (commit {commit}, {calls} calls a case)")
    return rows


def how_wrong(y, exact, bound: float) -> dict:
    """Where a wrong output is off: elements beyond the bound, how many of them are NaN or read
    exactly 0 (a lost sum, round 20's epilogue race), and the rows and 64-column blocks they
    fall in."""
    off = ~((y.double() - exact).abs() <= bound)  # NaN counts as off
    at = off.nonzero()
    return dict(
        elements=int(off.sum()),
        nan=int(torch.isnan(y[off]).sum()),
        zero=int((y[off] == 0).sum()),
        rows=sorted(set(at[:, 0].tolist()))[:32],
        col_blocks=sorted(set((at[:, 1] // 64).tolist()))[:16],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--shared", action="store_true", help="other work ran on the machine")
    ap.add_argument("--cuda", action="store_true", help="also every CUDA-kernel configuration")
    ap.add_argument(
        "--resume", type=Path, help="an earlier stress_kernels.json: keep its rows, run the rest"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: stress_kernels.py needs a CUDA GPU")
    env = run_environment(args.shared)
    rows = earlier_rows(args.resume, env["commit"], 2 * args.iters) if args.resume else []
    done = {(r["bits"], r["dtype"], r["M"], r["route"]) for r in rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict]) -> None:
        failing = sum(1 for r in rows if r["wrong"] or r["nondet"])
        result = dict(env=env, rows=rows, failing=failing)
        tmp = out / "stress_kernels.json.tmp"  # a run stopped mid-write keeps the last file
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out / "stress_kernels.json")

    t0 = time.time()
    print(f"{'bits':>4} {'dtype':5} {'M':>3} {'route':10} {'wrong':>6} {'nondet':>6} worst ratio")
    for bits in (2, 3, 4):
        for dname, dtype in ACTIVATION_DTYPES.items():
            layer = random_mixed_linear(
                4096, 4096, bits=bits, num_salient=128, seed=bits, device="cuda", dtype=dtype
            )
            w = weights(layer, dtype)
            for M, name in cases(layer, args.cuda):
                if (bits, dname, M, name) in done:
                    continue
                seed = case_seed(bits, dname, M, name)
                r = dict(bits=bits, dtype=dname, **stress(layer, w, M, name, args.iters, seed))
                rows.append({**r, **env})
                write(rows)  # after every case: a run cut short keeps what it measured
                print(
                    f"{bits:>4} {dname:5} {M:>3} {name:10} {r['wrong']:>6} {r['nondet']:>6} "
                    f"{r['worst']}",
                    flush=True,
                )
    bad = [r for r in rows if r["wrong"] or r["nondet"]]
    calls = sum(r["calls"] for r in rows)
    print(
        f"\n{len(rows)} cases, {calls} calls (each x twice); {len(bad)} cases with a wrong or "
        f"nondeterministic call: {sorted({r['route'] for r in bad}) or 'none'}; "
        f"{time.time() - t0:.0f}s"
    )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
