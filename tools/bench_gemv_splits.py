"""The decode GEMV's k-tile and split count, measured: the rule's choice against a grid.

    PYTHONPATH=. python3 tools/bench_gemv_splits.py --idle [--shapes all|NxK,...] [--ms 1,2]
        [--bits 4,3,2] [--nsal 0,128] [--dtype fp16|bf16] [--budget S] [--out DIR] [--name FILE]
    python3 tools/bench_gemv_splits.py --table FILE[.gz]  # a saved run's table, nothing timed

The GEMV (``kernels/triton/gemv.py``) gives each of its ``n_split`` programs per column block
a contiguous run of the layer's ``K / BLOCK_K`` k-blocks, ``floor`` or ``ceil`` of the mean,
so a split count that does not divide the k-blocks leaves some programs one block longer than
the rest while the launch waits for them. This times, per (shape, M, bits, salient columns),
the rule's configuration (``gemv_config``) and each k-tile with the six split counts nearest
the rule's target (between half and twice it) whose longest share is at most 6% over the
mean, with ``bench_kernels.py``'s protocol: each configuration captured once per copy of the
layer in one CUDA graph (copies past 1.5 GB, so L2 does not hold the weights), the median
replay per call. Each configuration's result is first checked against the float64 product
(``BAD`` past 5e-3). A rerun with the same ``--out``/``--name`` skips the cells the file
already holds; ``--budget`` stops a run between cells (run it again to go on).

Shapes: "all" is ``bench_kernels.py``'s two groups and the 7B decode's fused layers (22016 x
4096 gate/up, 4096 x 11008 down) and Llama-3-8B's (6144 x 4096 qkv, 14336 x 4096 gate or up).
Writes ``gemv_splits_<gpu>.json`` under ``--out`` (default benchmarks/results), every row
stamped with the commit, versions, GPU and whether the machine was shared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kernels as bench  # noqa: E402
from provenance import (  # noqa: E402
    add_arguments,
    gpu_tag,
    provenance,
    read_json,
    shared_flag,
    stamp,
    write_json,
)

from gift_quant.kernels.triton import dispatch  # noqa: E402
from gift_quant.kernels.triton.gemv import (  # noqa: E402
    TUNED_TILES,
    gemv,
    gemv_config,
    imbalance,
    split_config,
    split_target,
)
from gift_quant.testing import graph_time_us  # noqa: E402

DECODE_SHAPES = [(22016, 4096), (4096, 11008), (6144, 4096), (14336, 4096)]
ALL_SHAPES = [s for g in bench.GROUPS.values() for s in g] + DECODE_SHAPES
MAX_IMBALANCE, PER_TILE = 1.06, 6


def grid(M: int, N: int, K: int, nsal: int, sms: int, group: int) -> list[tuple[str, dict]]:
    """("rule", the rule's) first, then each k-tile with the split counts near the target."""
    rule = gemv_config(M, N, K, 4, group, nsal, sms)
    out = [("rule", rule)]
    want = split_target(N, K)
    for bk in TUNED_TILES.get(triton.next_power_of_2(M), (32,)):
        if group % bk or K % bk:
            continue
        n_kb = K // bk
        even = [
            s
            for s in range(max(1, want // 2), min(n_kb, 2 * want) + 1)
            if imbalance(n_kb, s) <= MAX_IMBALANCE
        ]
        for s in sorted(sorted(even, key=lambda s: abs(math.log(s / want)))[:PER_TILE]):
            cfg = split_config(M, N, nsal, sms, bk, s)
            if all(cfg != c for _, c in out):
                out.append((f"bk{bk}x{s}", cfg))
    return out


def _call(x, L, nsal: int, bits: int, cfg: dict):
    ws, cnt = dispatch.workspace(x.device, x.shape[0] * L["sz"].shape[1])
    wst, sidx = (L["wst"], L["sidx"]) if nsal else (None, None)
    return gemv(
        x, L["q"], L["sz"], wst, sidx, None, ws, cnt, bits=bits, group=bench.GROUP, config=cfg
    )


def run(args, shapes, ms, bits_list, nsals, dtype, out: Path, prov: dict) -> list[dict]:
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {(r["N"], r["K"], r["M"], r["bits"], r["nsal"], r["dtype"]) for r in rows}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    t0 = time.time()
    for N, K in shapes:
        for bits in bits_list:
            for nsal in nsals:
                todo = [M for M in ms if (N, K, M, bits, nsal, args.dtype) not in done]
                if not todo:
                    continue
                if time.time() - t0 > args.budget:
                    print(f"budget spent: stopped before {N}x{K} W{bits} nsal={nsal}", flush=True)
                    return rows
                copies = bench.rotated_copies(N, K, bits)
                base = copies[0]
                for M in todo:
                    x = torch.randn(M, K, device="cuda", dtype=dtype)
                    ref = bench.reference(x, base)
                    if not nsal:  # the salient columns' codes sit at the zero-point: drop them
                        ref = ref - x.double()[:, base["sidx"].long()] @ base["wst"].double()
                    line = []
                    for name, cfg in grid(M, N, K, nsal, sms, bench.GROUP):
                        try:
                            y = _call(x, base, nsal, bits, cfg)
                            rel = float((y.double() - ref).norm() / ref.norm())
                            calls = [partial(_call, x, L, nsal, bits, cfg) for L in copies]
                            t = graph_time_us(calls, reps=9)
                        except Exception as exc:  # noqa: BLE001 - report, go on
                            print(f"  {N}x{K} M={M} {name}: {exc!r}"[:200], flush=True)
                            continue
                        row = dict(N=N, K=K, M=M, bits=bits, nsal=nsal, dtype=args.dtype)
                        row.update(name=name, cfg=cfg, us=t, rel_err=rel)
                        rows.append(stamp(row, prov))
                        line.append((t, name, rel))
                    rule_t = next((t for t, n, _ in line if n == "rule"), float("nan"))
                    best = min(line)
                    bad = [n for _, n, rel in line if rel >= 5e-3]
                    print(
                        f"{N}x{K} W{bits} nsal={nsal:<3d} M={M}: rule {rule_t:6.2f} us, best "
                        f"{best[1]} {best[0]:6.2f} ({best[0] / rule_t:.3f}x)"
                        + (f" BAD {bad}" if bad else ""),
                        flush=True,
                    )
                write_json(out, rows)  # after each cell group: a cut run keeps what it timed
                del copies, base
                torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    """Per cell: the rule's time, the fastest configuration and its ratio; geometric means."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["N"], r["K"], r["M"], r["bits"], r["nsal"], r["dtype"]), []).append(r)
    lines = ["| shape | M | bits | nsal | rule | us | fastest | us | ratio |", "|" + "---|" * 9]
    logs = []
    for key in sorted(cells):
        N, K, M, bits, nsal, _ = key
        rule = next((r for r in cells[key] if r["name"] == "rule"), None)
        best = min(cells[key], key=lambda r: r["us"])
        if rule is None:
            continue
        rc = rule["cfg"]
        logs.append(math.log(best["us"] / rule["us"]))
        ratio = best["us"] / rule["us"]
        lines.append(
            f"| {N}x{K} | {M} | {bits} | {nsal} | bk{rc['BLOCK_K']}x{rc['n_split']} | "
            f"{rule['us']:.2f} | {best['name']} | {best['us']:.2f} | {ratio:.3f} |"
        )
    if logs:
        lines.append(
            f"\nfastest / rule, geometric mean over {len(logs)} cells: "
            f"{math.exp(sum(logs) / len(logs)):.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="all", help='"all" or NxK, comma-separated')
    ap.add_argument("--ms", default="1,2", help="rows, comma-separated (GEMV: at most 8)")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--nsal", default="0,128", help="salient columns per layer, 0 or 128")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; stops between cells")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--name", default=None, help="result file (default gemv_splits_<gpu>.json)")
    ap.add_argument("--table", metavar="FILE", help="print a saved run's table; time nothing")
    add_arguments(ap)
    args = ap.parse_args()
    if args.table:
        print(table(read_json(args.table)))
        return
    try:  # every argument read before any work
        shapes = (
            ALL_SHAPES
            if args.shapes == "all"
            else [bench.parse_shape(s) for s in args.shapes.split(",")]
        )
        ms = [int(v) for v in args.ms.split(",")]
        bits_list = [int(v) for v in args.bits.split(",")]
        nsals = [int(v) for v in args.nsal.split(",")]
    except ValueError as exc:
        raise SystemExit(f"bench_gemv_splits: {exc}") from None
    if any(not 1 <= m <= 8 for m in ms):
        raise SystemExit(f"bench_gemv_splits: --ms {args.ms}: the GEMV takes 1 to 8 rows")
    if any(b not in (2, 3, 4) for b in bits_list):
        raise SystemExit(f"bench_gemv_splits: --bits {args.bits}: 2, 3 or 4")
    if any(n not in (0, bench.NSAL) for n in nsals):
        raise SystemExit(f"bench_gemv_splits: --nsal {args.nsal}: 0 or {bench.NSAL}")
    shared = shared_flag(ap, args)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemv_splits needs a CUDA device")
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    out = Path(args.out) / (args.name or f"gemv_splits_{gpu_tag()}.json")
    rows = run(args, shapes, ms, bits_list, nsals, dtype, out, provenance(shared))
    write_json(out, rows)
    print(table(rows))
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
