"""Recovery table on the real SmolLM2-135M: what fine-tuning the salient columns buys at w3 g64
and w2 g64, against salient-FT without noise, pre-quantization GIFT-SW, LoRA with matched
trainable parameters, and GIFT-SW + distillation.

    python tools/bench_recovery.py [--bits 3 2] [--steps 200] [--out FILE.json]

Every row is one `python -m gift_quant recover` process (so its peak RSS is its own) with the
same recipe (recipes/smollm2-w3g64-gift.yaml) except the row's own keys; post-mode rows start
from the same quantized model (the quantize stage is run once and copied in), see the same
tokens in the same order with the same seeds. Perplexity: held-out wiki articles 80-106,
40 windows of 512 tokens, fp32. Rows are saved as they finish; a rerun skips finished rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import add_arguments, provenance, shared_flag, stamp, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

ROWS = {
    "salient-FT (no noise)": ["train.method=gift", "train.noise=none"],
    "GIFT-SW post": ["train.method=gift", "train.noise=normal"],
    "GIFT-SW pre": ["train.method=gift", "train.mode=pre"],
    "LoRA (matched params)": ["train.method=lora"],
    "GIFT-SW post + distill": ["train.method=gift", "train.kd_weight=0.5"],
    # ablations (run with --rows): a quarter of the noise variance, a 3x learning rate
    "GIFT-SW post, 6-bit noise": ["train.method=gift", "train.b_noise=6"],
    "GIFT-SW post, lr 3e-4": ["train.method=gift", "train.lr=3e-4"],
    "salient-FT, lr 3e-4": ["train.method=gift", "train.noise=none", "train.lr=3e-4"],
    "LoRA, lr 3e-4": ["train.method=lora", "train.lr=3e-4"],
}
DEFAULT_ROWS = list(ROWS)[:5]


def recover(out: Path, overrides: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "gift_quant",
        "recover",
        "--recipe",
        "smollm2-w3g64-gift",
        "--out",
        str(out),
        "--json",
        "-q",
    ]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"recover failed: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    p.add_argument("--work", default=str(ROOT / "runs/bench_recovery"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/recovery_smollm2.json"))
    p.add_argument(
        "--markdown", action="store_true", help="only print the saved results as a markdown table"
    )
    add_arguments(p)
    args = p.parse_args()
    if args.markdown:
        print_markdown(json.loads(Path(args.out).read_text()))
        return

    prov = provenance(shared_flag(p, args))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def save():
        write_json(out, results)

    for bits in args.bits:
        common = [f"quant.bits={bits}", f"train.steps={args.steps}", f"train.lr={args.lr}"]
        base_key = f"w{bits}g64 | GPTQ + 3% salient, before training"
        base_dir = work / f"w{bits}-base"
        if base_key not in results["rows"]:
            r = recover(base_dir, [*common, "train.method=none"])
            row = {
                "bits": bits,
                "perplexity": r["perplexity_recovered"],
                "bits_per_weight": r["bits_per_weight"],
                "report": r,
            }
            results["rows"][base_key] = stamp(row, prov)
            save()
        for label in args.rows:
            key = f"w{bits}g64 | {label}"
            if key in results["rows"]:
                continue
            row_dir = (
                work / f"w{bits}-{label.split(' (')[0].replace(' ', '_').replace('+', 'plus')}"
            )
            overrides = [*common, *ROWS[label]]
            if "train.mode=pre" not in overrides and not (row_dir / "quantized").exists():
                row_dir.mkdir(parents=True, exist_ok=True)  # same quantized start for every row
                shutil.copytree(base_dir / "quantized", row_dir / "quantized")
                for f in ("eval_fp.json", "eval_quantized.json"):
                    shutil.copy(base_dir / f, row_dir / f)
            r = recover(row_dir, overrides)
            t = r["train"]
            results["rows"][key] = {
                "bits": bits,
                "perplexity": r["perplexity_recovered"],
                "perplexity_before": r["perplexity_quantized"],
                "fp": r["perplexity_fp"],
                "bits_per_weight": r["bits_per_weight"],
                "seconds_per_step": t["seconds_per_step"],
                "peak_rss_mb": t["peak_rss_mb"],
                "trainable_params": t["trainable_params"],
                "tokens": t["tokens"],
                "report": r,
            }
            stamp(results["rows"][key], prov)
            save()
            print(f"{key:48s} ppl {r['perplexity_recovered']:8.3f}", flush=True)
    print_table(results)


def print_markdown(results: dict) -> None:
    rows = results["rows"]
    print("| setting | method | perplexity | s/step | peak RSS (MiB) | trainable |")
    print("|---|---|---:|---:|---:|---:|")
    for key, r in rows.items():
        setting, method = key.split(" | ")
        step = f"{r['seconds_per_step']:.2f}" if "seconds_per_step" in r else ""
        rss = f"{r['peak_rss_mb']:,.0f}" if "peak_rss_mb" in r else ""
        par = f"{r['trainable_params']:,}" if "trainable_params" in r else ""
        print(f"| {setting} | {method} | {r['perplexity']:.2f} | {step} | {rss} | {par} |")


def print_table(results: dict) -> None:
    rows = results["rows"]
    print(
        f"\n{'setting | method':52s} {'ppl':>8s} {'s/step':>7s} {'peak MiB':>9s} {'trainable':>10s}"
    )
    for key, r in rows.items():
        step = f"{r['seconds_per_step']:7.2f}" if "seconds_per_step" in r else " " * 7
        rss = f"{r['peak_rss_mb']:9.0f}" if "peak_rss_mb" in r else " " * 9
        par = f"{r['trainable_params']:10d}" if "trainable_params" in r else " " * 10
        print(f"{key:52s} {r['perplexity']:8.3f} {step} {rss} {par}")
    for bits in (3, 2):
        g, lora = (
            rows.get(f"w{bits}g64 | GIFT-SW post"),
            rows.get(f"w{bits}g64 | LoRA (matched params)"),
        )
        if g and lora:
            step = g["seconds_per_step"] / lora["seconds_per_step"]
            rss = g["peak_rss_mb"] / lora["peak_rss_mb"]
            print(f"w{bits}: GIFT-SW / LoRA step time {step:.2f}x, peak RSS {rss:.2f}x")


if __name__ == "__main__":
    main()
