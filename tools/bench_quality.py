"""Quality table on the real SmolLM2-135M: held-out Wikipedia perplexity of RTN and GPTQ with and
without salient columns, the owq/quik presets, and gptqmodel's GPTQ as the peer.

    python tools/bench_quality.py [--rows all|ours|peer] [--out FILE.json]

Protocol: every Linear of every decoder block quantized; the same 128
calibration windows of 512 tokens (seed 0) from Wikipedia articles 0-79 for every row; perplexity
on the first 40 non-overlapping 512-token windows of articles 80-106 (20,440 predicted tokens),
fp32 compute. Every quantized row is scored from its export directory, loaded back with
gift_quant.load_quantized -- gptqmodel's checkpoints too (a plain GPTQ v1 checkpoint is a mixed
checkpoint without salient columns). Rows are saved to the JSON as they finish; a rerun skips
rows already there (delete the file to start over).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gift_quant.data import calibration_windows, eval_windows, load_documents, tokenize_documents
from gift_quant.evaluate import perplexity
from gift_quant.io.export import save_quantized
from gift_quant.io.load import load_quantized
from gift_quant.modeling import load_model
from gift_quant.quantize import quantize_model
from gift_quant.recipe import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import add_arguments, provenance, shared_flag, stamp, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CALIB = ["calib.num_samples=128", "calib.seq_len=512", "calib.seed=0", "calib.batch_size=8"]
EVAL_WINDOWS, SEQ = 40, 512


def our_rows() -> list[tuple[str, list[str]]]:
    rows = []
    for bits in (4, 3, 2):
        for method in ("rtn", "gptq"):
            for frac in (0.0, 0.03):
                label = f"{method} w{bits}g64" + (" +3% gift" if frac else "")
                rows.append(
                    (
                        label,
                        [
                            f"quant.method={method}",
                            f"quant.bits={bits}",
                            "quant.group_size=64",
                            f"saliency.fraction={frac}",
                            "saliency.metric=gift",
                        ],
                    )
                )
    for metric in ("owq", "quik"):
        rows.append(
            (
                f"gptq w3g64 +3% {metric}",
                [
                    "quant.method=gptq",
                    "quant.bits=3",
                    "quant.group_size=64",
                    "saliency.fraction=0.03",
                    f"saliency.metric={metric}",
                ],
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="all", choices=["all", "ours", "peer"])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/quality_smollm2.json"))
    p.add_argument("--work", default=None, help="directory for exports (default: a temp dir)")
    p.add_argument("--redo", nargs="*", default=[], help="row labels to measure again")
    add_arguments(p)
    args = p.parse_args()
    prov = provenance(shared_flag(p, args))

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    for label in args.redo:
        results["rows"].pop(label, None)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_quality-"))
    work.mkdir(parents=True, exist_ok=True)

    base = load_recipe(None, CALIB)
    model, tok = load_model(base.model)
    heldout = tokenize_documents(tok, load_documents("wiki-heldout"))
    windows = eval_windows(heldout, SEQ, EVAL_WINDOWS * SEQ)
    calib = calibration_windows(tokenize_documents(tok, load_documents("wiki")), 128, 512, 0)
    results["protocol"] = {
        "model": "SmolLM2-135M-Instruct (embedded, fp16 weights)",
        "calibration": "128 x 512 tokens, seed 0, wiki articles 0-79",
        "eval": f"{windows.shape[0]} x {SEQ} tokens of wiki articles 80-106, fp32",
    }  # versions, machine and threads: each row's "provenance"

    def save():
        write_json(out, results)

    def score(label: str, mdl, extra: dict) -> None:
        r = perplexity(mdl, windows, batch_size=8, desc=label)
        row = {**extra, "perplexity": r["perplexity"], "tokens": r["tokens"]}
        results["rows"][label] = stamp(row, prov)
        save()
        print(f"{label:28s} ppl {r['perplexity']:9.3f}  {json.dumps(extra)}", flush=True)

    if "fp16" not in results["rows"]:
        score("fp16", model, {"bits_per_weight": 16.0})
    del model

    if args.rows in ("all", "ours"):
        for label, overrides in our_rows():
            if label in results["rows"]:
                continue
            recipe = load_recipe(None, CALIB + overrides)
            model, tok = load_model(recipe.model)
            rep = quantize_model(model, tok, recipe)
            export = work / label.replace(" ", "_").replace("%", "pct").replace("+", "")
            shutil.rmtree(export, ignore_errors=True)
            save_quantized(model, export, tokenizer=tok, recipe=recipe)
            del model
            score(
                label,
                load_quantized(export, dtype=torch.float32),
                {
                    "bits_per_weight": rep.bits_per_weight,
                    "seconds_quantize": rep.seconds_total,
                    "calib_dtype": "bfloat16",
                },
            )

    if args.rows in ("all", "peer"):
        from safetensors.torch import save_file

        from gift_quant.assets import default_model_dir

        wfile = work / "calib_windows.safetensors"
        save_file({"input_ids": calib.contiguous()}, wfile)
        for bits in (4, 3, 2):
            label = f"gptqmodel w{bits}g64"
            if label in results["rows"]:
                continue
            dest = work / f"gptqmodel-w{bits}"
            shutil.rmtree(dest, ignore_errors=True)
            cmd = [
                sys.executable,
                str(ROOT / "tools/peer_gptqmodel.py"),
                "--model",
                str(default_model_dir()),
                "--windows",
                str(wfile),
                "--bits",
                str(bits),
                "--group-size",
                "64",
                "--dtype",
                "bfloat16",
                "--batch-size",
                "8",
                "--out",
                str(dest),
            ]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"gptqmodel failed for w{bits}")
            peer = json.loads(proc.stdout.strip().splitlines()[-1])
            peer["seconds_subprocess"] = time.perf_counter() - t0
            m = load_quantized(dest, dtype=torch.float32)
            layers = [mod for mod in m.modules() if hasattr(mod, "storage_bits")]
            bpw = sum(x.storage_bits() for x in layers) / sum(
                x.in_features * x.out_features for x in layers
            )
            score(
                label,
                m,
                {
                    "bits_per_weight": bpw,
                    "seconds_quantize": peer["seconds_quantize"],
                    "calib_dtype": peer["dtype"],
                    "peer": peer,
                },
            )

    print_table(results)


def print_table(results: dict) -> None:
    rows = results["rows"]
    fp = rows.get("fp16", {}).get("perplexity")
    print(f"\n{'setting':28s} {'bits/w':>7s} {'ppl':>10s} {'vs fp16':>8s} {'quantize s':>11s}")
    for label, r in rows.items():
        rel = f"{r['perplexity'] / fp:8.3f}" if fp else ""
        secs = f"{r['seconds_quantize']:11.1f}" if "seconds_quantize" in r else " " * 11
        print(f"{label:28s} {r['bits_per_weight']:7.3f} {r['perplexity']:10.3f} {rel} {secs}")
    for bits in (4, 3, 2):
        ours, peer = rows.get(f"gptq w{bits}g64"), rows.get(f"gptqmodel w{bits}g64")
        if ours and peer:
            ppl = ours["perplexity"] / peer["perplexity"]
            secs = ours["seconds_quantize"] / peer["seconds_quantize"]
            print(f"w{bits}g64: ours/gptqmodel perplexity {ppl:.3f}, quantize time {secs:.2f}x")


if __name__ == "__main__":
    main()
