"""Recovery cost: the GIFT-SW set-up, and GIFT-SW / LoRA / DoRA training steps.

    python tools/bench_train_cost.py EXPORT [--device cpu] [--batch 2] [--seq 128] [--steps 4]
        [--noise-bits 6] [--methods gift lora dora] [--out FILE.json] [--shared]

EXPORT is a quantized model directory (``python -m gift_quant quantize`` or a recover run's
``quantized/``). Set-up: the time to swap every MixedLinear for a GiftLinear, which runs the
noise-scale search (``noise.noise_step``) on every layer. Steps: forward + backward + AdamW on
random token ids of batch x seq, the median of --steps after one warm-up step, each method on
a fresh copy of the model, in fp32 on the CPU (bf16 on a GPU). Prints a table; the JSON rows
record the commit, the versions, the processors and --shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gift_quant.io.load import load_quantized  # noqa: E402
from gift_quant.testing import run_environment  # noqa: E402
from gift_quant.train.gift_linear import attach_gift  # noqa: E402
from gift_quant.train.lora import attach_lora  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--noise-bits", type=int, default=6)
    ap.add_argument("--methods", nargs="+", default=["gift", "lora", "dora"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shared", action="store_true", help="other work ran on the machine")
    ap.add_argument("--no-verify", action="store_true", help="skip the manifest's checksums")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = run_environment(args.shared)
    rows = []

    def fresh():
        return load_quantized(args.export, device=device, dtype=dtype, verify=not args.no_verify)

    model = fresh()
    t0 = time.perf_counter()
    layers = attach_gift(model, "normal", args.noise_bits)
    sync(device)
    setup = time.perf_counter() - t0
    rows.append(dict(what="gift set-up (noise-scale search)", layers=len(layers), seconds=setup))
    print(f"GIFT-SW set-up, {len(layers)} layers: {setup:.2f} s", flush=True)
    del model, layers

    vocab = None
    for method in args.methods:
        model = fresh()
        vocab = vocab or model.config.vocab_size
        if method == "gift":
            attach_gift(model, "normal", args.noise_bits)
        else:
            model, _ = attach_lora(model, dora=method == "dora")
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
        times = []
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if step:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        trainable = sum(p.numel() for p in params)
        rows.append(dict(what=f"{method} step", seconds=med, trainable=trainable))
        print(
            f"{method:5s} step: {med:.3f} s (median of {len(times)}), {trainable:,} trainable",
            flush=True,
        )
        del model, opt, params
    base = {r["what"]: r["seconds"] for r in rows}
    print("\n| what | seconds | vs GIFT-SW step |\n|---|---:|---:|")
    for r in rows:
        ratio = r["seconds"] / base["gift step"] if "gift step" in base else float("nan")
        print(
            f"| {r['what']} | {r['seconds']:.3f} | "
            f"{'' if 'set-up' in r['what'] else f'{ratio:.2f}x'} |"
        )
    settings = dict(
        export=str(args.export),
        device=str(device),
        dtype=str(dtype),
        batch=args.batch,
        seq=args.seq,
        noise_bits=args.noise_bits,
    )
    out = [dict(**r, **settings, **env) for r in rows]
    if args.out:
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
