"""Correctness of the Triton kernels against the torch reference, on the GPU.

    PYTHONPATH=. python3 tools/check_kernels.py [--out DIR] [--workers N] [--limit S] [--shared]
    PYTHONPATH=. python3 tools/check_kernels.py --compile-only     # no GPU needed

Every bit width (2, 3, 4) x activation dtype (fp16, bf16) x M in {1, 2, 4, 8, 16, 24, 32, 64, 256} x
shape (4096x4096 g128 with 128 salient columns; an odd 960x1536 g64 layer with 37 salient
columns and a bias; 576x1024 with group -1 and no salient columns), each call on fresh random
inputs and a NaN-poisoned output buffer, through the kernel the op picks (``route``, or
where the CUDA kernels are built, the choice ``tuned_route`` measured at the shape's first
call); and every
candidate kernel of ``routes.candidates(M)`` (M in CAND_MS, the first two shapes): a failing
Triton candidate is reported for the route tables to avoid, and a failing configuration of
the CUDA kernel (one the first-use timing may pick) counts as a failure. A case
passes when max |out - exact| <= ERROR_FACTOR (3) x max |ref - exact| (+1e-6), where exact is
the float64 oracle and ref the torch reference in the same dtype; a NaN or an unwritten
element fails. Then: the custom op under CUDA-graph capture and replay, torch.compile, the
backward of base_matmul, a NaN input propagating, and AUTO dispatch of MixedLinear. Writes
check_kernels.json under --out (every row with the commit, versions, GPU/CPU and whether the
machine was shared); exit status 1 on any failure. ``--limit S`` (default 1800): the kernel
cases not done after S seconds are reported, each with the kernel its worker was running and
for how long (a kernel that never finishes holds its worker), and the check ends with status
1, writing the rows it has. ``--compile-only`` compiles every kernel
(2/3/4 bits, fp16/bf16, every mm configuration) for sm_90 with Triton's own ptxas and stops:
it needs no GPU; exit status 1 where a kernel writes registers an MMA may still read or zeroes
the split-K workspace before a barrier (``kernels.sass``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gift_quant.kernels import ACTIVATION_DTYPES, Backend, reference  # noqa: E402
from gift_quant.kernels import dequant_matmul as dispatch  # noqa: E402
from gift_quant.kernels.cuda import native  # noqa: E402
from gift_quant.kernels.triton import dispatch as triton_dispatch  # noqa: E402
from gift_quant.kernels.triton import ops as triton_ops  # noqa: E402
from gift_quant.kernels.triton import routes  # noqa: E402
from gift_quant.kernels.triton.gemv import gemv_config  # noqa: E402
from gift_quant.testing import (  # noqa: E402
    ERROR_FACTOR,
    compile_for_gpu,
    kernel_error,
    oracle,
    random_mixed_linear,
    run_environment,
)

MS = [1, 2, 4, 8, 16, 24, 32, 64, 256]
CAND_MS = [1, 2, 3, 5, 8, 16, 32, 64, 200]  # every kernel of routes.candidates(M), shapes 0, 1
SHAPES = [  # (K, N, group, salient, bias)
    (4096, 4096, 128, 128, False),
    (1536, 960, 64, 37, True),
    (1024, 576, -1, 0, False),
]
FACTOR = ERROR_FACTOR


PROGRESS = "GQ_CHECK_PROGRESS_DIR"  # where each worker notes the kernel it is running


def note_progress(what: str | None) -> None:
    """This worker's current kernel case, one line in a file of its own under $PROGRESS (the
    time first): what a case that does not finish was running; None: none (the file gone)."""
    where = os.environ.get(PROGRESS)
    if where:
        note = Path(where, f"{os.getpid()}.txt")
        if what is None:
            note.unlink(missing_ok=True)
        else:
            note.write_text(f"{time.time():.3f} {what}\n")


def notes_in(where: str) -> None:
    """A worker's initializer: its progress notes go under ``where``."""
    os.environ[PROGRESS] = where


def stuck(where: Path, now: float) -> list[str]:
    """One line per worker's last noted kernel case, the longest running first."""
    notes = []
    for f in where.glob("*.txt"):
        t, _, what = f.read_text().strip().partition(" ")
        notes.append((now - float(t), what))
    return [f"{what} (running {age:.0f} s)" for age, what in sorted(notes, reverse=True)]


def run_routed(x: torch.Tensor, layer, name: str | None = None) -> torch.Tensor:
    """The kernel the op picks (``route``, or the measured ``tuned_route`` where the CUDA
    kernels are built, and for the GEMV's configurations at M <= 2 everywhere), or ``name``,
    writing into a NaN-poisoned output; and its name."""
    prep = triton_ops.prepare(layer)
    M, N = x.shape[0], layer.out_features
    args = (x, prep.q, prep.sz, prep.wst, prep.sidx, prep.sal_pos, layer.bias, prep.bits)
    if name is None:  # the rule where nothing is timed (routes.timed)
        name = triton_dispatch.tuned_route(*args, prep.group, prep.cuda)
    out = torch.full((M, N), float("nan"), device=x.device, dtype=x.dtype)
    return triton_dispatch.run_route(name, *args, prep.group, out=out, cuda=prep.cuda), name


def check_case(args) -> list[dict]:
    """Routed kernels at MS; with ``cand``, every candidate kernel at CAND_MS instead."""
    bits, dname, shape_i, cand = args
    K, N, group, nsal, bias = SHAPES[shape_i]
    dtype = ACTIVATION_DTYPES[dname]
    seed = 1000 * bits + 10 * shape_i + (dname == "bf16") + 7 * cand
    layer = random_mixed_linear(
        K,
        N,
        bits=bits,
        group_size=group,
        num_salient=nsal,
        bias=bias,
        seed=seed,
        device="cuda",
        dtype=dtype,
    )
    prep = triton_ops.prepare(layer)
    assert prep is not None
    triton_ops.cuda_layout(layer)  # fp16 and bf16 calls use it where the kernels are built
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for M in CAND_MS if cand else MS:
        mma = prep.cuda is not None
        wg = mma and native.wg_available()
        grp = prep.group  # the layer's group (per-channel: K)
        names = routes.candidates(M, mma=mma, N=N, K=K, wg=wg, group=grp) if cand else [None]
        for name in names:
            kind = "candidate" if cand else "routed"
            shown = name or "(the op's route)"
            note_progress(f"W{bits} {dname} {N}x{K} M={M} {kind} {shown}")
            x = torch.randn(M, K, device="cuda", dtype=dtype, generator=gen)
            exact = oracle(x, layer)
            ref = reference.dequant_matmul(x, layer)
            out, name = run_routed(x, layer, name)
            err, ref_err = kernel_error(out, ref, exact)
            rel = float((out.double() - exact).norm() / exact.norm())
            rows.append(
                dict(
                    bits=bits,
                    dtype=dname,
                    K=K,
                    N=N,
                    group=group,
                    salient=nsal,
                    bias=bias,
                    M=M,
                    route=name,
                    candidate=bool(cand),
                    err=err,
                    ref_err=ref_err,
                    rel=rel,
                    ok=bool(err <= FACTOR * ref_err + 1e-6),
                )
            )
    note_progress(None)
    return rows


def extra_checks() -> list[dict]:
    """Graph capture, torch.compile, backward, NaN propagation, AUTO dispatch (fp16, 4-bit)."""
    out = []
    layer = random_mixed_linear(
        2048, 1024, bits=4, num_salient=64, bias=True, seed=5, device="cuda"
    )
    for M in (1, 16):
        x = torch.randn(M, 2048, device="cuda", dtype=torch.float16)
        triton_ops.dequant_matmul(x, layer)  # compile + workspace outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = triton_ops.dequant_matmul(x, layer)
        x.copy_(torch.randn_like(x))
        g.replay()
        err, ref_err = kernel_error(y, reference.dequant_matmul(x, layer), oracle(x, layer))
        out.append(dict(check=f"cuda graph M={M}", ok=err <= FACTOR * ref_err + 1e-6, err=err))
    x = torch.randn(4, 2048, device="cuda", dtype=torch.float16)
    try:
        compiled = torch.compile(lambda t: layer(t) * 2)
        y = compiled(x)
        err, ref_err = kernel_error(y / 2, reference.dequant_matmul(x, layer), oracle(x, layer))
        out.append(dict(check="torch.compile", ok=err <= FACTOR * ref_err + 1e-6, err=err))
    except Exception as exc:  # noqa: BLE001 - reported as a failed check
        out.append(dict(check="torch.compile", ok=False, error=repr(exc)[:300]))
    for M in (3, 64, 300):
        x = torch.randn(M, 2048, device="cuda", dtype=torch.float16, requires_grad=True)
        y = triton_ops.base_matmul(x, layer)
        gy = torch.randn_like(y)
        y.backward(gy)
        w = oracle(torch.eye(2048, device="cuda", dtype=torch.float64), layer, base_only=True)
        exact = gy.double() @ w.t()
        ref = gy @ w.t().to(torch.float16)
        err, ref_err = kernel_error(x.grad, ref, exact)
        out.append(
            dict(
                check=f"base_matmul backward M={M}",
                ok=err <= FACTOR * ref_err + 1e-6,
                err=err,
                ref_err=ref_err,
            )
        )
    for M in (1, 16, 300):
        x = torch.randn(M, 2048, device="cuda", dtype=torch.float16)
        x[0, 7] = float("nan")
        y = triton_ops.dequant_matmul(x, layer)
        out.append(dict(check=f"NaN input propagates M={M}", ok=bool(y[0].isnan().any())))
    for bits in (4, 3, 2):  # the GEMV with its register cap (more programs than one wave)
        for dtype in (torch.float16, torch.bfloat16):
            wide = random_mixed_linear(
                4096, 28672, bits=bits, num_salient=128, seed=bits, device="cuda", dtype=dtype
            )
            x = torch.randn(1, 4096, device="cuda", dtype=dtype)
            y, name = run_routed(x, wide, "gemv")
            err, ref_err = kernel_error(y, reference.dequant_matmul(x, wide), oracle(x, wide))
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            capped = "maxnreg" in gemv_config(1, 28672, 4096, bits, 128, 128, sms)
            ok = capped and err <= FACTOR * ref_err + 1e-6
            check = f"GEMV capped registers 28672x4096 W{bits} {str(dtype)[6:]} M=1"
            out.append(dict(check=check, ok=ok, err=err, ref_err=ref_err))
    x = torch.randn(2, 2048, device="cuda", dtype=torch.float16)
    y = dispatch(x, layer, Backend.AUTO)
    err, ref_err = kernel_error(y, reference.dequant_matmul(x, layer), oracle(x, layer))
    cache = getattr(layer, "_triton_cache", None)
    out.append(dict(check="AUTO dispatch uses Triton", ok=bool(cache) and err <= FACTOR * ref_err))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--shared", action="store_true", help="other work ran on the machine")
    ap.add_argument("--compile-only", action="store_true", help="compile for sm_90 and stop")
    ap.add_argument(
        "--limit", type=float, default=1800.0, help="seconds the kernel cases may take in all"
    )
    args = ap.parse_args()
    if not args.limit > 0:
        ap.error(f"--limit {args.limit:g}: give a positive number of seconds")
    if args.compile_only:
        bad = 0
        for line in compile_for_gpu():
            print(line, flush=True)
            bad += bool(re.search(r", [1-9]\d* (writes to operands|zeroing unordered)", line))
        print(
            f"\n{bad} kernels with writes to operands of MMAs not waited for or an unordered "
            "workspace zeroing",
            flush=True,
        )
        sys.exit(1 if bad else 0)
    env = run_environment(args.shared)
    t0 = time.time()
    cases = [(b, d, s, 0) for b in (4, 3, 2) for d in ACTIVATION_DTYPES for s in range(len(SHAPES))]
    cases += [(b, d, s, 1) for b in (4, 3, 2) for d in ACTIVATION_DTYPES for s in (0, 1)]
    rows, late, done = [], [], 0
    with (
        tempfile.TemporaryDirectory(prefix="gq-check-") as notes,
        mp.get_context("spawn").Pool(args.workers, initializer=notes_in, initargs=(notes,)) as pool,
    ):
        parts = pool.imap_unordered(check_case, cases)
        for _ in cases:
            try:
                part = parts.next(timeout=max(0.0, t0 + args.limit - time.time()))
            except mp.TimeoutError:
                late = stuck(Path(notes), time.time())
                pool.terminate()
                break
            rows += part
            done += 1
            for r in part:
                flag = ("ok " if r["ok"] else "BAD") + ("c" if r["candidate"] else " ")
                print(
                    f"{flag} W{r['bits']} {r['dtype']} {r['N']}x{r['K']} g{r['group']} "
                    f"S{r['salient']} M={r['M']:<3d} {r['route']:9s} err={r['err']:.2e} "
                    f"ref_err={r['ref_err']:.2e} ratio={r['err'] / max(r['ref_err'], 1e-12):.2f} "
                    f"rel={r['rel']:.1e}",
                    flush=True,
                )
    if late:
        print(f"\nthe kernel cases did not finish in --limit {args.limit:g} s; still running:")
        for line in late:
            print(f"  {line}", flush=True)
    extras = extra_checks() if not late else []
    for e in extras:
        print(("ok  " if e["ok"] else "BAD ") + json.dumps(e), flush=True)
    routed = [r for r in rows if not r["candidate"]]
    # every CUDA-kernel configuration is one the first-use timing may route: a failure counts
    tunable = [r for r in rows if r["candidate"] and r["route"].startswith(("mma", "mmv", "wg"))]
    bad = [r for r in routed + tunable if not r["ok"]] + [e for e in extras if not e["ok"]]
    bad_cand = sorted({r["route"] for r in rows if r["candidate"] and not r["ok"]})
    worst = max((r["err"] / max(r["ref_err"], 1e-12) for r in routed), default=0.0)
    print(
        f"\n{len(routed)} routed kernel cases, {len(extras)} extra checks, {len(bad)} failures, "
        f"{len(cases) - done} of {len(cases)} groups of kernel cases unfinished; "
        f"worst err / ref_err = {worst:.2f} (bound {FACTOR}); {time.time() - t0:.0f}s\n"
        f"{len(rows) - len(routed)} candidate cases ({len(tunable)} of them CUDA-kernel "
        f"configurations, counted above); failing: {bad_cand or 'none'}"
    )
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    result = dict(
        env=env,
        rows=[{**r, **env} for r in rows],
        extras=[{**e, **env} for e in extras],
        failures=len(bad),
        failing_candidates=bad_cand,
        unfinished_groups=len(cases) - done,
        still_running=late,
    )
    tmp = outdir / "check_kernels.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(outdir / "check_kernels.json")
    sys.exit(1 if bad or late else 0)


if __name__ == "__main__":
    main()
