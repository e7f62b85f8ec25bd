"""The SM clock and board power while one kernel runs back to back, read through NVML.

    PYTHONPATH=. python3 tools/clock_load.py --idle \\
        [--case 28672x4096:512:wg:256x2x1 --case 28672x4096:512:cublas ...] [--seconds 1.5]
    PYTHONPATH=. python3 tools/clock_load.py --compare BASE.json NEW.json

Question it answers: a kernel that keeps more SMs busy takes longer per unit of work -- our
256-row whole tiles run a k-step in about 630 ns with 40 SMs busy and about 790 ns with all 132
(an H100). Either the clock drops under the power limit (then the time per k-step in *cycles*
stays the same, and cuBLAS pays the same) or something the SMs share, L2's bandwidth, paces them
(then the cycles grow too).

Each case ``NxK:M:NAME`` (W4 or ``--bits``, 128 salient columns, group 128: the kernel bench's
layer) is timed twice: with the bench's protocol (``bench_kernels``: a CUDA graph over copies of
the layer past 1.5 GB, median of 15 replays) and then replayed back to back for ``--seconds``
while a thread samples the SM clock, power and the clock-event reasons through NVML every 5 ms.
NAME is a configuration ``dispatch.run_route`` takes ("wg:256x2x1", ...), ``op`` (the routed op)
or ``cublas`` (torch.matmul on fp16 weights of the same shape). Printed per case: both times, the
clock (median and lowest), the power, the reasons seen, the fraction of the tensor pipe's dense
peak (4096 fp16 FLOP a clock per SM on sm_90) at the measured clock, and for whole 256-row tiles
the ns and cycles per k-step per wave. Writes ``clock_load_<gpu>.json`` (``--name``) under
``--out``, each row with the commit, versions, GPU and the shared flag. Each result is checked
against the float64 product first, except in a diagnosis build that skips the dequantization
(``GIFT_QUANT_CUDA_DEFINES=GQ_NO_DEQUANT``: what it costs in time and power, beside a normal run).

``--compare BASE NEW`` (no GPU) prints the cases two runs share, each reading BASE -> NEW: the
back-to-back time, clock, power, cycles per k-step and the energy a launch (time x power), with
the time and energy ratios; a run's switches (a diagnosis build's) are named in the header.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kernels as bench  # noqa: E402
from nvml_power import Nvml, Sampler, summary  # noqa: E402
from provenance import add_arguments, gpu_tag, read_json, shared_flag, write_json  # noqa: E402

from gift_quant.kernels.cuda import native  # noqa: E402
from gift_quant.testing import graph_time_us, run_environment, sustained_time_us  # noqa: E402

FLOP_PER_CLOCK_SM = 4096  # dense fp16/bf16 wgmma, sm_90 (989 TFLOP/s at 1830 MHz on 132 SMs)


def parse_case(spec: str) -> tuple[int, int, int, str]:
    """``NxK:M:NAME`` -> (N, K, M, NAME); SystemExit naming what is wrong, before any work."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[2]:
        raise SystemExit(
            f"clock_load: case {spec!r} is not NxK:M:NAME (e.g. 28672x4096:512:wg:256x2x1)"
        )
    try:
        N, K = bench.parse_shape(parts[0], bench.GROUP)
        M = int(parts[1])
    except ValueError as exc:
        raise SystemExit(f"clock_load: case {spec!r}: {exc}") from None
    if M < 1:
        raise SystemExit(f"clock_load: case {spec!r}: M must be at least 1")
    return N, K, M, parts[2]


def whole_256(name: str, N: int, K: int, M: int, sms: int) -> tuple[int, int, int] | None:
    """(tiles, waves, k-steps a tile) for a whole-tile 256-row configuration (one block per SM),
    else None."""
    m = re.fullmatch(r"wg:256x(\d+)x1", name)
    if not m:
        return None
    tiles = math.ceil(M / 256) * (N // (64 * int(m.group(1))))
    return tiles, math.ceil(tiles / sms), K // 64 + math.ceil(bench.NSAL / 64)


ROW_FIELDS = ("N", "K", "M", "bits", "name", "us", "watts", "mhz_median", "reasons")


def _case_key(row: dict) -> tuple[int, int, int, int, str]:
    return row["N"], row["K"], row["M"], row["bits"], row["name"]


def _run_label(rows: dict) -> str:
    """'GPU at commit' of a run's first row, with its switches (a diagnosis build's)."""
    r = next(iter(rows.values()))
    switches = ", ".join(f"{k}={v}" for k, v in (r.get("switches") or {}).items())
    label = f"{r.get('gpu', '?')} at {str(r.get('commit', '?'))[:7]}"
    return f"{label} ({switches})" if switches else label


def compare(base_path: str, new_path: str) -> list[str]:
    """The lines ``--compare`` prints: per case of BASE also in NEW (the same layer, M, bits and
    configuration), each reading BASE -> NEW, and the time and energy ratios NEW / BASE (energy
    a launch: the back-to-back time x the median power), then the cases only one run holds.
    SystemExit in one line where a file cannot be read, holds no readable rows or a case twice,
    or the runs share no case."""
    runs = []
    for path in (base_path, new_path):
        try:
            rows = read_json(path)
        except (OSError, ValueError) as exc:
            raise SystemExit(
                f"clock_load: --compare {path}: cannot read it as JSON: {exc}"
            ) from None
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            raise SystemExit(
                f"clock_load: --compare {path}: expected a non-empty list of rows as clock_load "
                f"writes (clock_load_<gpu>.json), got {type(rows).__name__}; a bench_kernels run "
                "goes to bench_kernels.py --compare"
            )
        missing = sorted({f for r in rows for f in ROW_FIELDS if f not in r})
        if missing:
            raise SystemExit(f"clock_load: --compare {path}: rows without {', '.join(missing)}")
        if not all(
            isinstance(r[f], (int, float)) and r[f] > 0 for r in rows for f in ("us", "watts")
        ):
            raise SystemExit(f"clock_load: --compare {path}: a row's us or watts is not positive")
        keys = [_case_key(r) for r in rows]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise SystemExit(
                f"clock_load: --compare {path}: case {twice[0]} read more than once; keep one"
            )
        runs.append(dict(zip(keys, rows, strict=True)))
    base, new = runs
    shared = [k for k in base if k in new]
    if not shared:
        raise SystemExit(
            f"clock_load: --compare: {base_path} and {new_path} share no case "
            "(layer, M, bits and configuration)"
        )

    def arrow(b: float, n: float, fmt: str) -> str:
        return f"{b:{fmt}} -> {n:{fmt}}"

    lines = [
        f"BASE {_run_label(base)} -> NEW {_run_label(new)}",
        f"{'case':32s} {'back-to-back us':>17s} {'n/b':>6s} {'MHz':>12s} {'W':>10s} "
        f"{'clk/k-step':>12s} {'mJ a launch':>14s} {'n/b':>6s}  reasons",
    ]
    for key in shared:
        b, n = base[key], new[key]
        eb, en = b["us"] * b["watts"] / 1e3, n["us"] * n["watts"] / 1e3
        clk = (
            arrow(b["clk_kstep"], n["clk_kstep"], ".0f")
            if b.get("clk_kstep") and n.get("clk_kstep")
            else "-"
        )
        N, K, M, bits, name = key
        lines.append(
            f"{f'{N}x{K} M={M} W{bits} {name}':32s} {arrow(b['us'], n['us'], '.1f'):>17s} "
            f"{n['us'] / b['us']:6.3f} {arrow(b['mhz_median'], n['mhz_median'], '.0f'):>12s} "
            f"{arrow(b['watts'], n['watts'], '.0f'):>10s} {clk:>12s} "
            f"{arrow(eb, en, '.1f'):>14s} {en / eb:6.3f}  {b['reasons']} -> {n['reasons']}"
        )
    for label, one, other in (("BASE", base, new), ("NEW", new, base)):
        alone = [
            f"{N}x{K} M={M} W{bits} {name}"
            for N, K, M, bits, name in one
            if (N, K, M, bits, name) not in other
        ]
        if alone:
            lines.append(f"only in {label}: " + ", ".join(alone))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append", default=[], metavar="NxK:M:NAME")
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4))
    ap.add_argument("--seconds", type=float, default=1.5, help="back-to-back time per case")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--name", default=None, help="result file (default clock_load_<gpu>.json)")
    ap.add_argument(
        "--compare",
        nargs=2,
        metavar=("BASE", "NEW"),
        help="JSON of two runs: their cases side by side",
    )
    add_arguments(ap)
    args = ap.parse_args()
    if args.compare:
        given = [
            f"--{k}"
            for k in ("case", "bits", "seconds", "name")
            if getattr(args, k) != ap.get_default(k)
        ]
        if given:
            ap.error(f"--compare reads two saved runs: give it without {', '.join(given)}")
        print("\n".join(compare(*args.compare)))
        return
    shared = shared_flag(ap, args)
    if not 0.1 <= args.seconds <= 600:
        ap.error(f"--seconds {args.seconds}: give 0.1 to 600 seconds a case")
    cases = [parse_case(c) for c in args.case]
    if not cases:
        ap.error("name at least one --case NxK:M:NAME")
    if not torch.cuda.is_available():
        raise SystemExit("clock_load needs a CUDA device")
    props = torch.cuda.get_device_properties(0)
    nvml = Nvml(f"GPU-{props.uuid}")
    # a diagnosis build whose warpgroup kernel skips the dequantization (GQ_NO_DEQUANT) gives
    # wrong products by design: its rows are timed, not checked (they record the switch)
    wrong_by_design = "GQ_NO_DEQUANT" in native.build_defines()
    env, sms, limit = run_environment(shared), props.multi_processor_count, nvml.power_limit_w()
    print(f"{props.name}: {sms} SMs, enforced power limit {limit:.0f} W", flush=True)
    out = Path(args.out) / (args.name or f"clock_load_{gpu_tag()}.json")
    rows, copies, shape = [], None, None
    print(
        f"{'case':34s} {'bench us':>9s} {'back-to-back':>12s} {'MHz med/min':>12s} {'W':>5s} "
        f"{'tensor %':>8s} {'ns/k-step':>9s} {'clk/k-step':>10s}  reasons"
    )
    for N, K, M, name in cases:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        if name == "cublas":
            calls, flop = bench.cublas_calls(x, N), 2.0 * M * N * K
        else:
            if shape != (N, K):
                copies, shape = None, None
                torch.cuda.empty_cache()
                copies, shape = bench.rotated_copies(N, K, args.bits), (N, K)
            ref = bench.reference(x, copies[0])
            run = bench.ours if name == "op" else partial(bench.cand_call, name)
            y = run(x, copies[0], args.bits)
            rel = float((y.double() - ref).norm() / ref.norm())
            if rel > 5e-3 and not wrong_by_design:
                raise SystemExit(f"clock_load: {name} on {N}x{K} M={M}: relative error {rel:.1e}")
            calls = [partial(run, x, L, args.bits) for L in copies]
            flop = 2.0 * M * N * (K + bench.NSAL)
        bench_us = graph_time_us(calls)
        sampler = Sampler(nvml)
        us = sustained_time_us(calls, args.seconds, timed_half=sampler)
        if not sampler.samples:
            raise SystemExit(f"clock_load: no NVML sample in {args.seconds / 2} s")
        power = summary(sampler.samples)
        clk, lowest, reasons = power["mhz_median"], power["mhz_min"], power["reasons"]
        tensor = flop / (us * 1e-6 * clk * 1e6 * sms * FLOP_PER_CLOCK_SM)
        row = dict(
            env,
            N=N,
            K=K,
            M=M,
            bits=args.bits,
            nsal=bench.NSAL,
            name=name,
            bench_us=bench_us,
            us=us,
            **power,
            power_limit_w=limit,
            tensor_frac=tensor,
            sms=sms,
        )
        geo = whole_256(name, N, K, M, sms)
        tail = f"{'-':>9s} {'-':>10s}"
        if geo:
            tiles, waves, ksteps = geo
            ns = us * 1e3 / (waves * ksteps)
            row.update(
                tiles=tiles, waves=waves, ksteps=ksteps, ns_kstep=ns, clk_kstep=ns * clk / 1e3
            )
            tail = f"{ns:9.0f} {ns * clk / 1e3:10.0f}"
        rows.append(row)
        print(
            f"{f'{N}x{K} M={M} {name}':34s} {bench_us:9.1f} {us:12.1f} "
            f"{f'{clk:.0f}/{lowest}':>12s} {row['watts']:5.0f} {100 * tensor:8.1f} {tail}  "
            f"{reasons}",
            flush=True,
        )
        del calls  # (cuBLAS's weight copies with it)
    write_json(out, rows)
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
