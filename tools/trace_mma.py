"""Per-block timelines of the tensor-core kernel for few rows (``mixed_mma.cu``, M <= 64) on one
layer: where a launch's time goes, phase by phase.

    PYTHONPATH=. python3 tools/trace_mma.py --shape 4096x4096 --m 16 \\
        --names mma:2x4k4,mma:4x8k2 [--bits 4] [--out DIR] [--shared]

Builds (once, cached apart) and loads the kernels with ``GQ_TRACE`` (``native.build_defines``):
thread 0 of each block (warp 0, which also sums the block's shares and the split-K tile)
records the global timer (ns) at its start, after the dependent wait, when x is staged, when
its salient steps are issued, when its first quantized k-step's words are in (its MMAs
issued), when its k-steps are done, when the block's shares are summed, when its split-K
atomics are issued, when the split-K count's answer is back, and at its exit; and whether it
summed the splits. The layer is ``bench_kernels.py``'s (128 salient columns, g128) in as many
copies as its bench rotates (the weights come from memory, not from L2): the copies run in
one CUDA graph as the bench times them, and the last launch of a replay is the one traced, so
its start overlaps the launch before it as in the bench.

Prints per configuration the graph's time per launch, the launch's span (first start to last
exit), and per phase the median time from each block's start and the median and latest time
from the launch's first start. Writes ``trace_mma_<gpu>.json`` (per block, every row with the
commit, versions, GPU and whether the machine was shared).
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
from functools import partial
from pathlib import Path

os.environ["GIFT_QUANT_CUDA_DEFINES"] = "GQ_TRACE"  # before the library loads

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_kernels import NSAL, cand_call, rotated_copies  # noqa: E402
from provenance import gpu_tag, provenance, stamp, write_json  # noqa: E402
from trace_wg import layer_args  # noqa: E402

from gift_quant.kernels.cuda import native  # noqa: E402
from gift_quant.kernels.triton import routes  # noqa: E402
from gift_quant.testing import _graph, graph_time_us  # noqa: E402

SLOTS, BLOCKS = 32, 8192  # fragments.cuh: GQ_TRACE_SLOTS, GQ_TRACE_BLOCKS
# mixed_mma.cu's (and fragments.cuh's) slots, in path order
PHASES = {
    1: "dependent wait done",
    2: "x staged",
    3: "salient steps issued",
    4: "first k-step in",
    5: "k-steps done",
    6: "shares summed",
    7: "atomics issued",
    27: "split-K count back",
    30: "exit",
}
LAST, SMID, EXIT = 28, 29, 30


def read_trace() -> list[list[int]]:
    """Each traced block's 32 slots (blocks in grid order, those that ran), then zeroed."""
    buf = (ctypes.c_ulonglong * (SLOTS * BLOCKS))()
    if (rc := native.library().gq_mma_trace(ctypes.addressof(buf), SLOTS * BLOCKS)) != 0:
        raise RuntimeError(f"gq_mma_trace failed (code {rc})")
    rows = [list(buf[b * SLOTS : (b + 1) * SLOTS]) for b in range(BLOCKS)]
    return [r for r in rows if r[0]]


def summary(blocks: list[list[int]]) -> dict:
    """Per phase: the median ns from each block's start, the median and latest from the
    launch's first start (blocks that recorded it); the span, the starts' spread, how many
    blocks summed the splits. A block's start may precede the end of the launch before it
    (a programmatic dependent launch): its time to "dependent wait done" includes that wait."""
    t0 = min(r[0] for r in blocks)
    med = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
    phases = {}
    for slot, label in PHASES.items():
        seen = [r for r in blocks if r[slot]]
        if not seen:
            continue
        phases[label] = {
            "blocks": len(seen),
            "from_block_us": med([(r[slot] - r[0]) / 1e3 for r in seen]),
            "from_launch_us": med([(r[slot] - t0) / 1e3 for r in seen]),
            "latest_us": max((r[slot] - t0) / 1e3 for r in seen),
        }
    exits = [r[EXIT] for r in blocks if r[EXIT]]
    return {
        "blocks": len(blocks),
        "sms": len({r[SMID] for r in blocks}),
        "span_us": (max(exits) - t0) / 1e3 if exits else float("nan"),
        "start_spread_us": (max(r[0] for r in blocks) - t0) / 1e3,
        "summing_blocks": sum(1 for r in blocks if r[LAST] == 1),
        "phases": phases,
    }


def main() -> None:
    ap, args, shared, names, N, K = layer_args(
        __doc__, "4096x4096", 16, "mma:", "tensor-core configurations (mma:WNxS[kKW][cC])"
    )
    if not 1 <= args.m <= 64:
        ap.error(f"--m {args.m}: the kernel serves 1-64 rows")
    for name in names:
        try:  # a malformed name, or warps sharing a strip past 16 rows: refused before any work
            kw = routes.mma_config(name)[3]
        except ValueError:
            ap.error(f"--names: {name} is not mma:WNxS[kKW][cC]")
        if kw > 1 and args.m > 16:
            ap.error(
                f"--names: {name} shares strips (k{kw}), which the kernel does at 16 rows or fewer"
            )
    if not torch.cuda.is_available() or native.library() is None:
        sys.exit("trace_mma.py: needs a GPU with the CUDA kernels built (nvcc)")
    if not hasattr(native.library(), "gq_mma_trace"):
        sys.exit("trace_mma.py: the loaded kernel library was not built with GQ_TRACE")
    copies = rotated_copies(N, K, args.bits)
    x = torch.randn(args.m, K, device="cuda", dtype=torch.float16)
    prov = provenance(shared)
    rows = []
    print(f"{N}x{K} W{args.bits} M={args.m} nsal={NSAL}, {len(copies)} copies of the layer")
    for name in names:
        calls = [partial(cand_call, name, x, L, args.bits) for L in copies]
        per_call = graph_time_us(calls, reps=9)
        g = _graph(calls)  # replayed once in the capture: the buffer then holds its last launch
        read_trace()
        g.replay()
        torch.cuda.synchronize()
        blocks = read_trace()
        del g
        if not blocks:
            sys.exit(f"trace_mma.py: {name} left no timeline (no block of the launch recorded one)")
        s = summary(blocks)
        print(
            f"\n{name}: {per_call:.2f} us a launch (graph), span {s['span_us']:.2f} us, "
            f"{s['blocks']} blocks on {s['sms']} SMs, starts over {s['start_spread_us']:.2f} us, "
            f"{s['summing_blocks']} summed splits"
        )
        print("phase | blocks | from block start us | from launch start us | latest us")
        for label, p in s["phases"].items():
            print(
                f"{label} | {p['blocks']} | {p['from_block_us']:.2f} | "
                f"{p['from_launch_us']:.2f} | {p['latest_us']:.2f}"
            )
        row = {"N": N, "K": K, "M": args.m, "bits": args.bits, "nsal": NSAL, "name": name}
        rows.append(stamp({**row, "us": per_call, "summary": s, "blocks": blocks}, prov))
    path = Path(args.out) / f"trace_mma_{gpu_tag()}.json"
    write_json(path, {"rows": rows})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
