"""Kernel-level timing of the decode GEMV's L2 prefetch of the next layer's weights
(``rules.l2_prefetch``), apart from the rest of a model.

    PYTHONPATH=. python3 tools/bench_prefetch.py [--layers 8] [--gaps 0,4,16]
        [--fractions 0,0.05,0.125,0.25,0.5] [--modes bulk,lines] [--out DIR] [--shared]

A 7B decoder's four fused projections at M = 1 (q/k/v 12288x4096, o 4096x4096, gate/up
22016x4096, down 4096x11008; W4 g128, 128 salient columns, random weights), ``--layers`` of
them, run as one CUDA graph, each GEMV followed by a stand-in for the model's other kernels:
``torch.cuda._sleep`` for about GAP us (the GPU busy, its memory idle). Each GEMV prefetches
the next one's weights (the last none) within FRACTION x L2, in one bulk prefetch per program
and region ("bulk") or line by line ("lines"); fraction 0 is the prefetch off. Per (mode,
fraction, gap): the median of REPS replays minus the median of the same gaps alone, per
layer. The table prints it and its ratio to the prefetch off at the same gap; the JSON
(``prefetch_h200.json``) records every row with the commit, the environment and whether the
machine was shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from gift_quant.kernels.triton import dispatch, ops
from gift_quant.testing import random_mixed_linear, run_environment

SHAPES = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))  # (N, K), in call order
REPS = 30
CYCLES_PER_US = 1980  # the H200's boost clock: the gap's cycles; its time is measured


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--gaps", type=_floats, default=[0.0, 4.0, 16.0], help="us, comma-separated")
    ap.add_argument("--fractions", type=_floats, default=[0.0, 0.05, 0.125, 0.25, 0.5])
    ap.add_argument("--modes", default="bulk,lines")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--shared", action="store_true", help="other work ran on the machine")
    args = ap.parse_args()
    env = run_environment(args.shared)
    items = []
    for i in range(args.layers):
        for j, (N, K) in enumerate(SHAPES):
            layer = random_mixed_linear(
                K, N, bits=4, num_salient=128, seed=4 * i + j, device="cuda", dtype=torch.float16
            )
            x = torch.randn(1, K, device="cuda", dtype=torch.float16)
            out = torch.empty(1, N, device="cuda", dtype=torch.float16)
            items.append((layer, ops.prepare(layer), x, out))
    print(env, flush=True)

    def chain(gap_us: float, prefetch: bool) -> None:
        for i, (layer, p, x, out) in enumerate(items):
            nxt = items[i + 1][1] if prefetch and i + 1 < len(items) else None
            pf = (nxt.q, nxt.sz, nxt.wst) if nxt is not None else ()
            args_ = (x, p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
            dispatch.run_route("gemv", *args_, out=out, prefetch=pf)
            if gap_us:
                torch.cuda._sleep(int(gap_us * CYCLES_PER_US))

    def sleeps(gap_us: float) -> None:
        for _ in items:
            torch.cuda._sleep(int(gap_us * CYCLES_PER_US))

    def replay_us(fn) -> float:
        fn()  # compiles, sizes the workspace
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        times = []
        for _ in range(REPS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)

    gap_alone = {g: replay_us(lambda g=g: sleeps(g)) if g else 0.0 for g in args.gaps}
    rows = []
    for mode in args.modes.split(","):
        for f in args.fractions:
            os.environ["GIFT_QUANT_L2_PREFETCH"] = "lines" if mode == "lines" else "1"
            os.environ["GIFT_QUANT_L2_PREFETCH_FRACTION"] = str(f)
            for g in args.gaps:
                total = replay_us(lambda g=g, f=f: chain(g, f > 0))
                per_layer = (total - gap_alone[g]) / args.layers
                rows.append(
                    dict(
                        **env,
                        mode=mode,
                        fraction=f,
                        gap_us=g,
                        gap_measured_us=gap_alone[g] / len(items),
                        us_per_layer=per_layer,
                    )
                )
                print(f"{mode:5s} f={f:<6} gap={g:5.1f} {per_layer:8.2f} us/layer", flush=True)
    for k in ("GIFT_QUANT_L2_PREFETCH", "GIFT_QUANT_L2_PREFETCH_FRACTION"):
        os.environ.pop(k, None)
    off = {(r["mode"], r["gap_us"]): r["us_per_layer"] for r in rows if r["fraction"] == 0}
    print("\n| mode | fraction of L2 | " + " | ".join(f"gap {g:g} us" for g in args.gaps) + " |")
    print("|---|---|" + "---|" * len(args.gaps))
    for mode in args.modes.split(","):
        for f in args.fractions:
            cells = []
            for g in args.gaps:
                r = next(r for r in rows if (r["mode"], r["fraction"], r["gap_us"]) == (mode, f, g))
                cells.append(f"{r['us_per_layer']:.1f} ({off[(mode, g)] / r['us_per_layer']:.2f}x)")
            print(f"| {mode} | {f:g} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "prefetch_h200.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(out / "prefetch_h200.json")


if __name__ == "__main__":
    main()
