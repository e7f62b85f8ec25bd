"""The first-use timing against the benchmark's, side by side, on named configurations.

    PYTHONPATH=. python3 tools/bench_tuning.py --cells 12288x4096:3:512,5120x5120:4:512 \\
        --names wg:256x2x1s,wg:256x2x2c2,wg:256x2x1 [--out DIR] [--name FILE] [--shared]

The kernel a layer takes is the fastest of its candidates under the first-use timing
(``tuning._time``: graphs of at least GRAPH_CALLS launches cycling over copies of the layer
just past twice the L2 cache, into one output buffer, the candidates' graphs replayed in turn).
``tools/bench_kernels.py`` then times the op otherwise: one graph over copies past 1.5 GB, each
call with an output of its own. Where the two disagree the first use can keep the wrong kernel.
This times each configuration (and cuBLAS) in one process under:

- ``tune``: ``tuning._time`` as the first use runs it;
- ``tune_4n``, ``tune_R``: the same with four times its copies (at most the benchmark's), and
  with the benchmark's number of copies;
- ``bench``: ``graph_time_us`` over the benchmark's copies, a new output per call (its protocol);
- ``bench_out``: the same into one output buffer;
- ``bench_n``: the benchmark's protocol over the first use's number of copies.

Each configuration is checked against the float64 product first (``BAD`` past 5e-3). Prints a
table per cell; writes ``tuning_<gpu>.json`` (``--name``) under ``--out``, every row with the
commit, versions, GPU, CPU and whether the machine was shared.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kernels as bench  # noqa: E402
from provenance import gpu_tag  # noqa: E402

from gift_quant.kernels.triton import dispatch, tuning  # noqa: E402
from gift_quant.testing import graph_time_us, run_environment  # noqa: E402

PROTOCOLS = ("tune", "tune_4n", "tune_R", "bench", "bench_out", "bench_n")


def parse_cell(text: str) -> tuple[int, int, int, int]:
    """'NxK:bits:M' -> (N, K, bits, M)."""
    try:
        shape, bits, m = text.split(":")
        bits, M = int(bits), int(m)
    except ValueError:
        raise ValueError(f"cell {text!r}: expected NxK:bits:M, e.g. 5120x5120:4:512") from None
    N, K = bench.parse_shape(shape)  # its own one-line message
    if bits not in (2, 3, 4) or M < 1:
        raise ValueError(f"cell {text!r}: bits must be 2, 3 or 4 and M at least 1")
    return N, K, bits, M


def launch(name: str, x, L: dict, bits: int, out=None):
    if name == "cublas":
        return torch.matmul(x, L["w16"].t(), out=out)  # nn.Linear's layout, as the bench
    return dispatch.run_route(
        name, x, L["q"], L["sz"], L["wst"], L["sidx"], L["sal_pos"], None, bits, bench.GROUP,
        out=out, cuda=L["cuda"],
    )  # fmt: skip


def time_cell(N: int, K: int, bits: int, M: int, names: list[str]) -> dict:
    """{name: {protocol: us}} for one cell: the configurations that ran and matched the
    float64 product (NaN where the first use's timing left one out)."""
    copies = bench.rotated_copies(N, K, bits)
    base, R = copies[0], len(copies)
    for L in copies:  # cuBLAS reads fp16 weights of the layer's shape, one per copy
        L["w16"] = torch.randn(N, K, device="cuda", dtype=torch.float16)
    # the first use's copies: as many as pass twice L2 with the CUDA layout's bytes
    c = base["cuda"]
    own = sum(t.nbytes for t in (c.qc, c.zp, c.scp, c.wsp, c.sidx))
    n = tuning.copies_for(own, torch.device("cuda"))
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    ref = bench.reference(x, base)
    out = torch.empty(M, N, device="cuda", dtype=torch.float16)
    res, ok = {}, []
    for name in names:
        try:
            if name != "cublas":
                y = launch(name, x, base, bits)
                rel = float((y.double() - ref).norm() / ref.norm())
                if rel > 5e-3:
                    print(f"  {name}: BAD rel={rel:.1e}", flush=True)
                    continue
            ok.append(name)
        except Exception as exc:  # noqa: BLE001 - a configuration that does not run here
            print(f"  {name}: {exc!r}"[:200], flush=True)
    for name in ok:
        res[name] = {}

    def launchers(cs):
        return [lambda nm, L=L: launch(nm, x, L, bits, out=out) for L in cs]

    for proto, cs in (("tune", copies[:n]), ("tune_4n", copies[: 4 * n]), ("tune_R", copies)):
        t = tuning._time(ok, launchers(cs))
        for name in ok:
            res[name][proto] = t.get(name, math.nan) * 1e6
    few = [copies[i % n] for i in range(max(tuning.GRAPH_CALLS, n))]
    for name in ok:
        calls = [partial(launch, name, x, L, bits) for L in copies]
        res[name]["bench"] = graph_time_us(calls)
        res[name]["bench_out"] = graph_time_us([partial(c, out=out) for c in calls])
        res[name]["bench_n"] = graph_time_us([partial(launch, name, x, L, bits) for L in few])
    del copies, base
    torch.cuda.empty_cache()
    return {"copies_first_use": n, "copies_bench": R, "us": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", required=True, help="NxK:bits:M, comma-separated")
    ap.add_argument("--names", required=True, help="configurations, comma-separated")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--name", default=None, help="result file (default tuning_<gpu>.json)")
    ap.add_argument("--shared", action="store_true", help="other work ran on the machine")
    args = ap.parse_args()
    try:  # every argument read before any work
        cells = [parse_cell(c) for c in args.cells.split(",")]
    except ValueError as exc:
        raise SystemExit(f"bench_tuning: {exc}") from None
    names = [n for n in args.names.split(",") if n] + ["cublas"]
    if not torch.cuda.is_available():
        raise SystemExit("bench_tuning needs a CUDA device")
    env = run_environment(args.shared)
    out = Path(args.out) / (args.name or f"tuning_{gpu_tag()}.json")  # named before the work
    rows, t0 = [], time.time()
    for N, K, bits, M in cells:
        cell = time_cell(N, K, bits, M, names)
        print(
            f"{N}x{K} W{bits} M={M}: copies first use {cell['copies_first_use']}, "
            f"bench {cell['copies_bench']}"
        )
        print(f"  {'us':14s}" + "".join(f"{p:>10s}" for p in PROTOCOLS) + "  bench/tune")
        for name, t in cell["us"].items():
            cols = "".join(f"{t[p]:10.2f}" for p in PROTOCOLS)
            print(f"  {name:14s}{cols}  {t['bench'] / t['tune']:9.3f}", flush=True)
            copies = {k: cell[k] for k in ("copies_first_use", "copies_bench")}
            rows.append(dict(env, N=N, K=K, bits=bits, M=M, name=name, **copies, us=t))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # a temporary sibling, then a rename
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(out)
    print(f"{len(rows)} rows in {time.time() - t0:.0f} s -> {out}")


if __name__ == "__main__":
    main()
