"""Named kernel configurations timed per layer shape, M and number of salient columns.

    PYTHONPATH=. python3 tools/bench_configs.py --names wg:64x2x6c6,wg:64x2x8,mma:2x16 \\
        [--shapes 4096x4096,5120x5120] [--ms 1,16,32,64] [--nsal 0,128] [--bits 4] \\
        [--out DIR] [--name FILE] [--shared]

Any configuration ``dispatch.run_route`` takes ("wg:NTxWxS[cC]", "mma:WNxS[kKW][cC]",
"mmv:WNxS[dD][cC]", a Triton route), whether or not the route tables would time it at that M
(``bench_kernels --candidates`` times only those), beside cuBLAS fp16, with the protocol of
``bench_kernels.py``: each callable captured once per copy of the layer in one CUDA graph
(copies past 1.5 GB, so L2 does not hold the weights), the median replay per call. ``--nsal``
sets the salient columns per layer (0: none, so the salient k-steps and the warpgroup
kernel's gather launch drop out: their cost is the difference). Each result is checked
against the float64 product first (``BAD`` in the table when the relative error passes 5e-3).
Prints one line per (shape, nsal, M); writes ``configs_<gpu>.json`` (``--name``; <gpu> the GPU's
tag, h200 or h100) under ``--out`` (default benchmarks/results), every row with the commit,
versions, GPU and CPU and whether the machine was shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kernels as bench  # noqa: E402
from provenance import gpu_tag  # noqa: E402

from gift_quant.testing import graph_time_us, run_environment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--names", required=True, help="configurations, comma-separated")
    ap.add_argument("--shapes", default="4096x4096", help="NxK, comma-separated")
    ap.add_argument("--ms", default="1,16,32,64")
    ap.add_argument("--nsal", default="128", help="salient columns per layer, comma-separated")
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4))
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--name", default=None, help="result file (default configs_<gpu>.json)")
    ap.add_argument("--shared", action="store_true", help="other work ran on the machine")
    args = ap.parse_args()
    try:  # every argument read before any work
        shapes = [bench.parse_shape(s) for s in args.shapes.split(",")]
        ms, nsals = [int(v) for v in args.ms.split(",")], [int(v) for v in args.nsal.split(",")]
    except ValueError as exc:
        raise SystemExit(f"bench_configs: {exc}") from None
    if not torch.cuda.is_available():
        raise SystemExit("bench_configs needs a CUDA device")
    env = run_environment(args.shared)
    out = Path(args.out) / (args.name or f"configs_{gpu_tag()}.json")  # named before the work
    names, bits, rows, t0 = args.names.split(","), args.bits, [], time.time()
    for N, K in shapes:
        cublas = {}
        for nsal in nsals:
            bench.NSAL = nsal  # packed_layer and layer_bytes read it
            copies = bench.rotated_copies(N, K, bits)
            base = copies[0]
            for M in ms:
                if M not in cublas:
                    cublas[M] = bench.time_cublas(N, K, M, torch.float16)
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                ref = bench.reference(x, base)
                line = [f"{N}x{K} W{bits} nsal={nsal} M={M:<3d} cuBLAS {cublas[M]:6.2f}"]
                for name in names:
                    try:
                        y = bench.cand_call(name, x, base, bits)
                        rel = float((y.double() - ref).norm() / ref.norm())
                        calls = [partial(bench.cand_call, name, x, L, bits) for L in copies]
                        t = graph_time_us(calls, reps=9)
                    except Exception as exc:  # noqa: BLE001 - a configuration that does not run
                        print(f"  {name}: {exc!r}"[:200], flush=True)
                        continue
                    rows.append(
                        dict(
                            env,
                            N=N,
                            K=K,
                            M=M,
                            bits=bits,
                            nsal=nsal,
                            name=name,
                            us=t,
                            cublas_us=cublas[M],
                            rel_err=rel,
                        )
                    )
                    line.append(f"{name} {t:6.2f}{'' if rel < 5e-3 else f' BAD {rel:.1e}'}")
                print(" | ".join(line), flush=True)
            del copies, base
            torch.cuda.empty_cache()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # a temporary sibling, then a rename: never half a file
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(out)
    print(f"{len(rows)} rows in {time.time() - t0:.0f} s -> {out}")


if __name__ == "__main__":
    main()
