"""Per-block timelines of the warpgroup kernel (``mixed_wg.cu``) on one layer: where a launch's
time goes, block by block, for whole tiles, K splits and stream-K.

    PYTHONPATH=. python3 tools/trace_wg.py --shape 13824x5120 --m 512 \\
        --names wg:256x2x1,wg:256x2x1s [--bits 4] [--out DIR] [--shared]

Builds (once, cached apart) and loads the kernels with ``GQ_TRACE`` (``native.build_defines``):
thread 0 of each block records the global timer (ns) at its start, after the dependent wait,
and per segment (a stream-K block's share of one tile; one per block otherwise) when its first
k-step's copies are in place, when its MMAs are done and when its end is (the partial tile
stored, or the others summed and y written), then at its exit. The layer is
``bench_kernels.py``'s (128 salient columns, g128). Each configuration is run three times,
then once more traced. Prints per configuration: the launch's span (first start
to last exit), the spread of block starts, the median prologue (start to the first k-step's
data), the median time per k-step of the segments' loops, the median segment end by kind
(whole tile, a stream-K head that sums the others, a partial tile), the median exit after the
last segment, and the SMs' idle share of the span. Writes ``trace_wg_<gpu>.json`` (per block,
every row with the commit, versions, GPU and whether the machine was shared).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
from pathlib import Path

os.environ["GIFT_QUANT_CUDA_DEFINES"] = "GQ_TRACE"  # before the library loads

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_kernels import NSAL, cand_call, packed_layer  # noqa: E402
from kernel_tables import parse_shape  # noqa: E402
from provenance import add_arguments, gpu_tag, provenance, shared_flag, stamp, write_json  # noqa: E402

from gift_quant.kernels.cuda import native  # noqa: E402
from gift_quant.kernels.triton import routes  # noqa: E402

SLOTS, BLOCKS = 32, 8192  # fragments.cuh: GQ_TRACE_SLOTS, GQ_TRACE_BLOCKS
# mixed_wg.cu's slots: 0 start, 1 the dependent wait, segment s at 2 + 4 s (data, MMAs done,
# end, first k-step << 16 | k-steps; six segments at most), the SM, the exit
SEGMENTS, SMID, EXIT = 6, 29, 30


def read_trace() -> list[list[int]]:
    """Each traced block's 32 slots (blocks in grid order, those that ran), then zeroed."""
    lib = native.library()
    buf = (ctypes.c_ulonglong * (SLOTS * BLOCKS))()
    if (rc := lib.gq_wg_trace(ctypes.addressof(buf), SLOTS * BLOCKS)) != 0:
        raise RuntimeError(f"gq_wg_trace failed (code {rc})")
    rows = [list(buf[b * SLOTS : (b + 1) * SLOTS]) for b in range(BLOCKS)]
    return [r for r in rows if r[0]]


def segments(row: list[int]) -> list[dict]:
    """A block's segments: data in place, MMAs done, end done (ns), first k-step, k-steps."""
    out = []
    for s in range(SEGMENTS):
        t0, t1, t2, v = row[2 + 4 * s : 6 + 4 * s]
        if not t0:
            break
        out.append({"data": t0, "mma": t1, "end": t2, "d0": v >> 16, "steps": v & 0xFFFF})
    if out and not out[-1]["end"] and row[EXIT]:  # one segment, its end the block's epilogue
        out[-1]["end"] = row[EXIT]
    return out


def summary(blocks: list[list[int]], steps_per_tile: int, sm_count: int) -> dict:
    t0 = min(r[0] for r in blocks)
    exits = [r[EXIT] for r in blocks if r[EXIT]]
    span = (max(exits) - t0) / 1e3 if exits else float("nan")
    per_step, ends = [], {"whole": [], "head": [], "partial": []}
    firsts, lasts = [], []
    busy: dict[int, float] = {}
    for r in blocks:
        busy[r[SMID]] = busy.get(r[SMID], 0.0) + ((r[EXIT] or r[0]) - r[0]) / 1e3
        segs = segments(r)
        if segs:
            firsts.append(segs[0]["data"] - r[0])
            if r[EXIT] >= segs[-1]["end"]:
                lasts.append(r[EXIT] - segs[-1]["end"])
        for sg in segs:
            if sg["mma"] and sg["steps"]:
                per_step.append((sg["mma"] - sg["data"]) / sg["steps"])
            if sg["end"] and sg["mma"]:
                kind = (
                    "partial"
                    if sg["d0"] > 0
                    else "whole"
                    if sg["steps"] >= steps_per_tile
                    else "head"
                )
                ends[kind].append((sg["end"] - sg["mma"]) / 1e3)
    med = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
    return {
        "blocks": len(blocks),
        "span_us": span,
        "start_spread_us": (max(r[0] for r in blocks) - t0) / 1e3,
        "prologue_us": med(firsts) / 1e3,
        "ns_per_kstep": med(per_step),
        "end_whole_us": med(ends["whole"]),
        "end_head_us": med(ends["head"]),
        "end_partial_us": med(ends["partial"]),
        "exit_after_last_us": med(lasts) / 1e3,
        "idle_share": 1 - sum(busy.values()) / (sm_count * span) if exits else float("nan"),
    }


def layer_args(
    doc: str, shape: str, m: int, prefix: str, what: str
) -> tuple[argparse.ArgumentParser, argparse.Namespace, bool, list[str], int, int]:
    """The trace tools' common arguments (--shape, --m, --names, --bits, --out, the machine's
    state) read, with a one-line usage error for a malformed shape or a configuration that is
    not the tool's kernel's (``prefix``; ``what`` names them): (parser, args, shared, names,
    N, K)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--shape", default=shape, help="NxK")
    ap.add_argument("--m", type=int, default=m)
    ap.add_argument("--names", required=True, help="configurations, comma-separated")
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4))
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    add_arguments(ap)
    args = ap.parse_args()
    shared = shared_flag(ap, args)
    names = [n for n in args.names.split(",") if n]
    try:
        N, K = parse_shape(args.shape)
    except ValueError as exc:
        ap.error(f"--shape: {exc}")
    if bad := [n for n in names if not n.startswith(prefix)]:
        ap.error(f"--names: {bad} are not {what}")
    return ap, args, shared, names, N, K


def main() -> None:
    _, args, shared, names, N, K = layer_args(
        __doc__, "13824x5120", 512, "wg:", "warpgroup configurations (wg:NTxWxS...)"
    )
    if not torch.cuda.is_available() or native.library() is None or not native.wg_available():
        sys.exit("trace_wg.py: needs a GPU with the warpgroup kernel (sm_90a) and nvcc")
    if not hasattr(native.library(), "gq_wg_trace"):
        sys.exit("trace_wg.py: the loaded kernel library was not built with GQ_TRACE")
    L = packed_layer(N, K, args.bits, codes=False)
    x = torch.randn(args.m, K, device="cuda", dtype=torch.float16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    prov = provenance(shared)
    rows = []
    print(f"{N}x{K} W{args.bits} M={args.m} nsal={NSAL}, {sms} SMs")
    print(
        "config | blocks | span us | starts us | prologue us | ns/k-step | "
        "end whole/head/partial us | exit us | idle"
    )
    for name in names:
        routes.mma_config(name)  # a clear error for a malformed name, before any launch
        for _ in range(3):
            cand_call(name, x, L, args.bits)
        torch.cuda.synchronize()
        read_trace()
        cand_call(name, x, L, args.bits)
        torch.cuda.synchronize()
        blocks = read_trace()
        s = summary(blocks, K // 64 + -(-NSAL // 64), sms)
        print(
            f"{name} | {s['blocks']} | {s['span_us']:.1f} | {s['start_spread_us']:.1f} | "
            f"{s['prologue_us']:.2f} | {s['ns_per_kstep']:.0f} | {s['end_whole_us']:.2f}/"
            f"{s['end_head_us']:.2f}/{s['end_partial_us']:.2f} | {s['exit_after_last_us']:.2f} | "
            f"{s['idle_share']:.1%}"
        )
        row = {"N": N, "K": K, "M": args.m, "bits": args.bits, "nsal": NSAL, "name": name}
        rows.append(stamp({**row, "summary": s, "blocks": blocks}, prov))
    path = Path(args.out) / f"trace_wg_{gpu_tag()}.json"
    write_json(path, {"rows": rows})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
