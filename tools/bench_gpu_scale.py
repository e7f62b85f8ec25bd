"""A 7B-shaped model on one GPU: GPTQ time and peak memory, then GIFT-SW vs LoRA training memory
and step time on the same packed base.

    python tools/bench_gpu_scale.py [--shape 7b] [--start gptq|rtn] [--steps 4] [--out DIR]

1. A random-weight Llama of the shape (LLaMA-2-7B: 32 blocks, 4096 wide, MLP 11008), saved as
   fp16 safetensors with a BPE tokenizer trained on a synthetic corpus (no network here).
2. ``recover --set train.steps=0``: quantize it block by block on the GPU -- GPTQ w4 g128 + 128
   salient columns, 128 x 2048 calibration tokens -- and report the quantize stage's wall time and
   peak GPU memory (from report.json).
3. From that quantized start, ``recover`` with GIFT-SW and with LoRA of matched trainable
   parameters: gradient checkpointing, seq 2048, micro-batch 1; peak GPU memory of the training
   stage and s/step, as a ratio GIFT-SW / LoRA from the same run.
Rows go to --out/gpu_scale.json as they finish.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import build_model, run_recover  # noqa: E402
from provenance import add_arguments, provenance, shared_flag, stamp, write_json  # noqa: E402


def run(recipe: Path, out: Path, sets: list[str]) -> dict:
    return run_recover([sys.executable], recipe, out, sets, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="7b", choices=["tiny", "1.1b", "7b"])
    p.add_argument("--start", default="gptq", choices=["gptq", "rtn"])
    p.add_argument("--calib", type=int, default=128, help="calibration windows of --calib-len")
    p.add_argument("--calib-len", type=int, default=2048)
    p.add_argument("--seq", type=int, default=2048, help="training sequence length")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--methods", default="gift,lora")
    p.add_argument("--device", default="cuda")
    add_arguments(p)
    p.add_argument("--work", default="/tmp/bench_gpu_scale")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks/results")))
    args = p.parse_args()
    shared = shared_flag(p, args)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    build_model(work, args.shape, args.device)
    print(f"model built and saved in {time.perf_counter() - t0:.0f}s", flush=True)
    count, group = (8, 32) if args.shape == "tiny" else (128, 128)
    dt = "float32" if args.device == "cpu" else "bfloat16"
    recipe = work / "recipe.yaml"
    recipe.write_text(f"""
model: {{name_or_path: {work / "model"}, device: {args.device}, dtype: float16}}
calib: {{source: {work / "text.txt"}, num_samples: {args.calib}, seq_len: {args.calib_len},
        batch_size: 8}}
saliency: {{metric: gift, count: {count}}}
quant: {{method: {args.start}, bits: 4, group_size: {group}}}
train: {{method: gift, mode: post, data: {work / "text.txt"}, steps: {args.steps}, batch_size: 1,
        grad_accum: 1, seq_len: {args.seq}, lr: 1.0e-5, save_every: 0, dtype: {dt},
        grad_checkpointing: true}}
eval: {{text: [{work / "text.txt"}], seq_len: 2048, max_tokens: 8192, batch_size: 1, dtype: {dt}}}
""")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "gpu_scale.json"
    prov = provenance(shared)
    rows = []

    def save(row: dict) -> None:
        rows.append(stamp(dict(row), prov))
        print(json.dumps(row), flush=True)
        write_json(json_path, {"shape": args.shape, "rows": rows})

    base = work / "base"
    r = run(recipe, base, ["train.steps=0"])
    save(
        {
            "row": f"quantize {args.start} w4 g{group} + {count} salient",
            "calib_tokens": args.calib * args.calib_len,
            "quantize_seconds": r["seconds"]["quantize"],
            "quantize_peak_gpu_mb": (r.get("peak_gpu_mb") or {}).get("quantize"),
            "stage_seconds": r["seconds"],
            "stage_peak_gpu_mb": r.get("peak_gpu_mb"),
            "perplexity_fp": r["perplexity_fp"],
            "perplexity_quantized": r["perplexity_quantized"],
        }
    )
    train_rows = {}
    for method in args.methods.split(","):
        out = work / f"train_{method}"
        out.mkdir()
        shutil.copytree(base / "quantized", out / "quantized")
        for f in ("eval_fp.json", "eval_quantized.json"):
            shutil.copy(base / f, out / f)
        r = run(recipe, out, [f"train.method={method}"])
        t = r["train"]
        train_rows[method] = row = {
            "row": f"train {method}",
            "seq_len": args.seq,
            "micro_batch": 1,
            "steps": args.steps,
            "trainable_params": t["trainable_params"],
            "train_peak_gpu_mb": t["peak_gpu_mb"],
            "seconds_per_step": t.get("seconds_per_step_steady") or t["seconds_per_step"],
            "seconds_first_step": t.get("seconds_first_step"),
            "stage_seconds": r["seconds"],
            "stage_peak_gpu_mb": r.get("peak_gpu_mb"),
        }
        save(row)
    print(f"\n{'row':10s} {'trainable':>12s} {'peak GPU GiB':>13s} {'s/step':>8s}")
    for m, t in train_rows.items():
        print(
            f"{m:10s} {t['trainable_params']:12,d} {t['train_peak_gpu_mb'] / 1024:13.2f} "
            f"{t['seconds_per_step']:8.3f}"
        )
    if {"gift", "lora"} <= train_rows.keys():
        g, lo = train_rows["gift"], train_rows["lora"]
        print(
            f"GIFT-SW / LoRA: peak memory {g['train_peak_gpu_mb'] / lo['train_peak_gpu_mb']:.3f}x,"
            f" step time {g['seconds_per_step'] / lo['seconds_per_step']:.3f}x"
        )


if __name__ == "__main__":
    main()
