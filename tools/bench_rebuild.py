"""GIFT-SW's training-weight rebuild on the CPU: the CPU kernel against the torch twin.

    python tools/bench_rebuild.py [--model smollm2-135m | --shapes KxN,KxN,...] [--layers 30]
        [--bits 4] [--group 64] [--salient 32] [--dtype bf16|fp32] [--rounds 5] [--out FILE.json]
        (--idle | --shared)

Each training step rebuilds every GiftLinear's weight W^T = grid + seeded noise (salient rows
set to the trainable columns) once on the CPU (twice where the forward pass's is not kept).
Times one model's worth of rebuilds (random codes; the default is SmolLM2-135M's seven
projections in each of 30 blocks) through ``GiftLinear._weight_t_native`` (``cpu_noise.c``: one
pass, Triton's generator) and ``GiftLinear._weight_t_torch`` (dequantize, ``torch.randn``, add),
the best of --rounds each, in one process with torch's threads. Checks first that both give the
same noise-free weight bit for bit. Prints a table; each JSON row is stamped with the commit,
the versions, the processors and --idle/--shared.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import add_arguments, provenance, shared_flag, stamp, write_json  # noqa: E402

from gift_quant.kernels import cpu_native  # noqa: E402
from gift_quant.mixed_linear import MixedLinear  # noqa: E402
from gift_quant.testing import random_quantized  # noqa: E402
from gift_quant.train.gift_linear import GiftLinear  # noqa: E402

MODELS = {  # (in, out) of the projections of one decoder block
    "smollm2-135m": [
        (576, 576),
        (576, 192),
        (576, 192),
        (576, 576),
        (576, 1536),
        (576, 1536),
        (1536, 576),
    ],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMS = {
    "torch twin": GiftLinear._weight_t_torch,
    "CPU kernel": GiftLinear._weight_t_native,
}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]
    except ValueError:
        raise SystemExit(f"bench_rebuild: --shapes {text!r}: expected KxN,KxN,...") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    ap.add_argument("--shapes", default=None, help="in x out of each block's projections")
    ap.add_argument("--layers", type=int, default=30, help="blocks")
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--salient", type=int, default=32)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    add_arguments(ap)
    args = ap.parse_args()
    prov = provenance(shared_flag(ap, args))
    block = parse_shapes(args.shapes) if args.shapes else MODELS[args.model]
    if any(k % args.group for k, _ in block):
        raise SystemExit(f"bench_rebuild: --group {args.group} does not divide every input size")
    if cpu_native.library() is None:
        raise SystemExit("bench_rebuild: the CPU kernels could not be built on this machine")
    dtype = DTYPES[args.dtype]
    layers = []
    for i, (K, N) in enumerate(block * args.layers):
        qw, _ = random_quantized(K, N, args.bits, args.group, args.salient, False, i, False)
        base = MixedLinear.from_quantized(qw, None)
        delta = torch.rand(N, generator=torch.Generator().manual_seed(i)) * 0.01
        g = GiftLinear(base, base.salient_idx, base.salient_weight.float(), None, delta=delta)
        layers.append(g)
    for g in layers:  # the same noise-free weight, and unpacked codes cached for both forms
        ws = g.salient_weight.detach()
        a, b = (f(g, dtype, "none", None, ws) for f in FORMS.values())
        if not torch.equal(a, b):
            raise SystemExit("bench_rebuild: the two forms disagree without noise")
    elements = sum(g.in_features * g.out_features for g in layers)
    rows = []
    for name, f in FORMS.items():
        best = float("inf")
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for i, g in enumerate(layers):
                f(g, dtype, "normal", 1000 * r + i, g.salient_weight.detach())
            best = min(best, time.perf_counter() - t0)
        rows.append(
            dict(
                form=name,
                seconds=best,
                layers=len(layers),
                elements=elements,
                dtype=args.dtype,
                bits=args.bits,
                group=args.group,
                threads=torch.get_num_threads(),
            )
        )
    base_s = rows[0]["seconds"]
    print(
        f"\n{len(layers)} layers, {elements / 1e6:.1f} M weights, {args.dtype}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| rebuild | seconds per model | x torch twin's time | ns per weight |")
    print("|---|---:|---:|---:|")
    for r in rows:
        r["x_torch"] = r["seconds"] / base_s
        ns = 1e9 * r["seconds"] / elements
        print(f"| {r['form']} | {r['seconds']:.3f} | {r['x_torch']:.2f} | {ns:.2f} |")
    if args.out:
        print(f"wrote {write_json(args.out, [stamp(r, prov) for r in rows])}")


if __name__ == "__main__":
    main()
