"""Per-layer CPU matmul routes on SmolLM2-135M's Linear shapes: what the CPU backend picks from.

    python tools/bench_cpu_kernels.py --shared [--rows 1,4,16,32,64] [--repeats 5]
        [--out benchmarks/results/cpu_kernels_smollm2.json]

For one decoder block's seven Linears (576x576 q/o, 192x576 k/v, 1536x576 gate/up,
576x1536 down; w4 g64, 3% salient columns, random codes), copied 30 times so that, as in a real
decode step, the weights do not stay in the L3 cache, the time of one pass over all 210 layers
at M rows, for:
  * fp32_linear: ``F.linear`` on fp32 weights (what an unquantized fp32 model does);
  * packed: our C kernel (``Backend.CPU_PACKED``; base, salient columns and bias in one call);
  * dequant_mm: the kernel's dequantizer then a torch matmul (the CPU route above 32 rows);
  * dense: a cached fp32 copy of the weight (``Backend.CPU_DENSE``);
  * reference: dequantize every call (``Backend.TORCH``, the oracle);
  * torch_int4: ``_weight_int4pack_mm_for_cpu`` (exact for this format);
  * torch_int8: ``_weight_int8pack_mm`` with per-channel scales (speed only: one scale per
    output column cannot hold a group-wise format exactly);
  * dyn_quant_4bit: ``_dyn_quant_matmul_4bit`` where torch has it (speed only: it quantizes the
    activations to 8 bits, so it is not exact either);
and for the tied output Linear (49152 x 576, once per pass): head_fp32 (``F.linear``) and
head_fp16 (our kernel on the exact fp16 copy, what ``CpuHead`` runs).
Each figure is the median of ``--repeats`` passes, wall and process CPU time; rows of one run
are comparable with each other, absolute times of a shared machine are not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import add_arguments, provenance, shared_flag, stamp, write_json  # noqa: E402

from gift_quant.kernels import Backend, cpu, cpu_native, dequant_matmul  # noqa: E402
from gift_quant.testing import random_mixed_linear  # noqa: E402

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
BLOCKS = 30


def _layers():
    made = []
    for i, (N, K) in enumerate(SHAPES):
        layer = random_mixed_linear(
            K, N, bits=4, group_size=64, num_salient=round(0.03 * K), bias=False, seed=i
        ).float()
        made.append(layer)
    return made


def _routes(layers, rows: int) -> dict:
    """name -> a function running one pass over BLOCKS copies of the block at ``rows`` rows."""
    import copy

    copies = [copy.deepcopy(layers[i % len(layers)]) for i in range(BLOCKS * len(layers))]
    xs = {K: torch.randn(rows, K) for K in {k for _, k in SHAPES}}
    routes = {}
    fp32 = [layer.dequantize(torch.float32) for layer in copies]  # [N, K] dense weights
    routes["fp32_linear"] = lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in fp32]
    if cpu_native.library() is not None:
        packs = [cpu._packed(layer) for layer in copies]
        routes["packed"] = lambda: [cpu_native.mixed_gemm(xs[p.K], p) for p in packs]
        routes["dequant_mm"] = lambda: [xs[p.K] @ cpu_native.dequantize(p) for p in packs]
    for name, backend in (("dense", Backend.CPU_DENSE), ("reference", Backend.TORCH)):
        if name == "reference" and rows > 1:
            continue  # seconds per pass; its decode figure is the one that matters
        routes[name] = lambda b=backend: [
            dequant_matmul(xs[layer.in_features], layer, b) for layer in copies
        ]
    int4 = [cpu._int4_pack(layer) for layer in copies]
    routes["torch_int4"] = lambda: [
        torch.ops.aten._weight_int4pack_mm_for_cpu(xs[w.shape[1]], p, 64, sz)
        for w, (p, sz) in zip(fp32, int4, strict=True)
    ]
    int8 = [(w.to(torch.int8), torch.ones(w.shape[0])) for w in fp32]
    routes["torch_int8"] = lambda: [
        torch.ops.aten._weight_int8pack_mm(xs[w.shape[1]], w, s) for w, s in int8
    ]
    if hasattr(torch.ops.aten, "_dyn_quant_pack_4bit_weight"):
        try:
            dyn = []
            for w in fp32:
                N, K = w.shape
                codes = torch.randint(0, 16, (N, K // 2), dtype=torch.uint8)
                scales = torch.rand(N, K // 64)
                packed = torch.ops.aten._dyn_quant_pack_4bit_weight(codes, scales, None, 64, K, N)
                dyn.append((packed, K, N))
            routes["dyn_quant_4bit"] = lambda: [
                torch.ops.aten._dyn_quant_matmul_4bit(xs[K], p, 64, K, N) for p, K, N in dyn
            ]
            routes["dyn_quant_4bit"]()
        except (RuntimeError, NotImplementedError) as exc:
            print(f"dyn_quant_4bit skipped: {str(exc).splitlines()[0]}")
            routes.pop("dyn_quant_4bit", None)
    head = torch.randn(49152, 576).half().float()
    routes["head_fp32"] = lambda: torch.nn.functional.linear(xs[576], head)
    if cpu_native.library() is not None:
        half = cpu_native.HalfWeight(head)
        routes["head_fp16"] = lambda: cpu_native.half_gemm(xs[576], half)
    return routes


def _time(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm: caches built, pages touched
    wall, cpu_s = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu_s.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,16,32,64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/cpu_kernels_smollm2.json")
    add_arguments(p)
    args = p.parse_args()
    shared = shared_flag(p, args)
    torch.manual_seed(0)
    layers = _layers()
    env = provenance(shared)
    rows_out = []
    with torch.no_grad():
        for rows in [int(r) for r in args.rows.split(",")]:
            routes = _routes(layers, rows)
            row = {"rows": rows, "layers": BLOCKS * len(SHAPES), "ms": {}, "cpu_ms": {}}
            for name, fn in routes.items():
                wall, cpu_s = _time(fn, args.repeats)
                row["ms"][name], row["cpu_ms"][name] = wall * 1e3, cpu_s * 1e3
            rows_out.append(stamp(row, env))
            ms = row["ms"]
            base = {k: ms["head_fp32" if k.startswith("head") else "fp32_linear"] for k in ms}
            cells = [f"{k} {v:.1f} ms ({base[k] / v:.2f}x)" for k, v in ms.items()]
            print(f"M={rows:<4d} " + "  ".join(cells), flush=True)
    write_json(
        args.out,
        {
            "setup": (
                f"one pass over {BLOCKS} copies of SmolLM2-135M's 7 block Linears (w4 g64, 3% "
                f"salient, fp32 activations) and the 49152x576 head; median of {args.repeats}; "
                "speed-up = fp32_linear (head_fp32 for the head) / route"
            ),
            "rows": rows_out,
        },
    )


if __name__ == "__main__":
    main()
