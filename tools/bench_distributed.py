"""Multi-GPU recovery: throughput, peak memory and per-stage time of GIFT-SW on 1 GPU vs N GPUs
(DDP, FSDP), and whether N GPUs train the same salient columns as one.

    python tools/bench_distributed.py [--gpus 2] [--steps 8] [--rows one,ddp,fsdp] [--out DIR]
    python tools/bench_distributed.py --tiny --cpu     # the same flow on CPU processes (gloo)

A 1.1B-parameter Llama (TinyLlama-1.1B shape) with random weights, RTN w4 g128 + 128 salient
columns. The model and its quantized start are built ONCE (in --work; ``--reuse`` keeps them
across calls), then each row is one ``python -m gift_quant recover`` from that start: one
process, and under torchrun N processes with train.parallel=ddp / fsdp, same global batch.
Scaling is printed two ways: over one process at the per-GPU batch of the N-GPU rows (row
``per_gpu``: data-parallel scaling, N GPUs doing N times the work) and over one process at the
global batch (row ``one``: the same job split N ways).
``--before DIR`` adds a row run with the package found in DIR (an older checkout) for a
before/after comparison of the per-stage seconds. Text: a synthetic corpus written here (no
network) and a byte-level BPE trained on it: a throughput benchmark, not a quality one.
Rows are appended to --out/bench_distributed.json as they finish (a killed run keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import build_model  # noqa: E402
from _synthetic import run_recover as recover  # noqa: E402
from provenance import add_arguments, provenance, shared_flag, stamp, write_json  # noqa: E402


def salient_diff(a: Path, b: Path, steps: int) -> dict:
    """How far run b's trained salient columns are from run a's, against how far a moved them:
    max |a - b| and max |a - start|, and the relative L2 distance ||a - b|| / ||a - start||."""
    from safetensors.torch import load_file

    def ckpt(run: Path) -> dict:
        return load_file(run / f"train/checkpoints/step-{steps:06d}/trainable.safetensors")

    start = load_file(a / "quantized/salient.safetensors")
    ta, tb = ckpt(a), ckpt(b)
    diff = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
    moved = max(float((ta[k].float() - start[k].float()).abs().max()) for k in ta)
    d2 = sum(float((ta[k].float() - tb[k].float()).square().sum()) for k in ta)
    m2 = sum(float((ta[k].float() - start[k].float()).square().sum()) for k in ta)
    return {
        "salient_max_abs_diff_vs_one": diff,
        "salient_max_abs_moved": moved,
        "salient_rel_l2_diff_vs_one": (d2 / m2) ** 0.5 if m2 else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument(
        "--rows",
        default="one,per_gpu,accum2,ddp,fsdp",
        help="comma list of: one (1 process, the global batch), per_gpu (1 process, the "
        "per-GPU batch of the N-GPU rows: the base of data-parallel scaling), accum2 (1 "
        "process, half micro-batches x 2: the same global batch summed in another order, the "
        "numerical tolerance), ddp, fsdp",
    )
    p.add_argument("--before", help="checkout of an older version: adds a 1-process row run by it")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--reuse", action="store_true", help="keep --work's model and quantized start")
    add_arguments(p)
    p.add_argument("--work", default="/tmp/bench_distributed")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks/results")))
    args = p.parse_args()
    shared = shared_flag(p, args)
    prov = provenance(shared)  # first: a commit name its git contradicts is refused before the run

    work = Path(args.work)
    device = "cpu" if args.cpu else "cuda"
    if not (args.reuse and (work / "base/quantized/config.json").is_file()):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        build_model(work, "tiny" if args.tiny else "1.1b", device, 20_000 if args.tiny else 200_000)
        print(f"model built in {time.perf_counter() - t0:.0f}s", flush=True)
    model_dir, text = work / "model", work / "text.txt"
    recipe = work / "recipe.yaml"
    dtype = "float32" if args.cpu else "bfloat16"
    recipe.write_text(f"""
model: {{name_or_path: {model_dir}, device: {device}, dtype: float16}}
calib: {{source: {text}, num_samples: 8, seq_len: 256, batch_size: 4, true_sequential: false}}
saliency: {{metric: gift, count: {8 if args.tiny else 128}}}
quant: {{method: rtn, bits: 4, group_size: {32 if args.tiny else 128}}}
train: {{method: gift, mode: post, data: {text}, steps: {args.steps}, batch_size: {args.batch},
        grad_accum: 1, seq_len: {args.seq}, lr: 1.0e-4, save_every: 0, dtype: {dtype},
        dist_timeout_s: 300}}
eval: {{text: [{text}], seq_len: 256, max_tokens: 1024, batch_size: 4, dtype: {dtype}}}
""")
    # the same recipe for an older checkout, without the keys it does not know
    old_recipe = work / "recipe_before.yaml"
    old_recipe.write_text(re.sub(r",\s*dist_timeout_s: \d+", "", recipe.read_text()))
    py = [sys.executable]
    base = work / "base"
    if not (base / "quantized/config.json").is_file():
        t0 = time.perf_counter()
        recover(py, recipe, base, ["train.steps=0"], ROOT)
        print(f"quantized start in {time.perf_counter() - t0:.0f}s", flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench_distributed.json"
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    single = {
        "one": [],
        "per_gpu": [f"train.batch_size={args.batch // args.gpus}"],
        "accum2": [f"train.batch_size={args.batch // 2}", "train.grad_accum=2"],
    }
    plan = []
    for r in rows:
        if r in single:
            plan.append((r, 1, ["train.parallel=ddp", *single[r]], ROOT))
        else:
            plan.append((r, args.gpus, [f"train.parallel={r}"], ROOT))
    if args.before:
        plan.append(("before", 1, ["train.parallel=ddp"], Path(args.before).resolve()))
    runs: dict[str, dict] = {}
    for label, nproc, sets, code in plan:
        out = work / f"run_{label}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        shutil.copytree(base / "quantized", out / "quantized")
        for f in ("eval_fp.json", "eval_quantized.json"):
            shutil.copy(base / f, out / f)
        prefix = py
        if nproc > 1:
            prefix = [*py, "-m", "torch.distributed.run", "--standalone"]
            prefix += [f"--nproc_per_node={nproc}"]
        rec = recipe if code == ROOT else old_recipe
        r = recover(prefix, rec, out, sets, code)
        t = r["train"]
        row = {
            "row": label,
            "processes": nproc,
            "settings": sets,
            "code": "this commit" if code == ROOT else f"older checkout {code.name}",
            "steps": args.steps,
            "global_batch": args.batch // args.gpus if label == "per_gpu" else args.batch,
            "seq_len": args.seq,
            "tokens_per_second": t["tokens_per_second_steady"],
            "seconds_per_step": t.get("seconds_per_step_steady") or t["seconds_per_step"],
            "seconds_first_step": t.get("seconds_first_step"),
            "peak_gpu_mb_rank0": t["peak_gpu_mb"],
            "peak_rss_mb_rank0": t["peak_rss_mb"],
            "perplexity_recovered": r["perplexity_recovered"],
            "stage_seconds": r["seconds"],
            "stage_peak_gpu_mb": r.get("peak_gpu_mb"),
            "wall_seconds": r["wall_seconds"],
        }
        if label not in ("one", "per_gpu", "before") and "one" in runs:
            row.update(salient_diff(work / "run_one", out, args.steps))
        runs[label] = row
        print(label, json.dumps(row), flush=True)
        stamp(row, prov)
        old = json.loads(json_path.read_text()) if json_path.is_file() else {}
        kept = [x for x in old.get("rows", []) if x.get("row") != label]
        write_json(
            json_path,
            {
                "model": "tiny" if args.tiny else "TinyLlama-1.1B shape, random weights",
                "setting": "RTN w4 g128 + 128 salient, GIFT-SW post, bf16",
                "rows": [*kept, row],
            },
        )
    one = runs.get("one", {}).get("tokens_per_second")
    per_gpu = runs.get("per_gpu", {}).get("tokens_per_second")
    print(
        "\nscaling: tokens/s over the 1-GPU row with the same per-GPU batch (per_gpu: data-"
        "parallel scaling) and with the same global batch (one: the same job split in N)"
    )
    print(
        f"{'run':8s} {'tokens/s':>10s} {'scaling':>8s} {'vs one':>7s} {'s/step':>7s}"
        f" {'peak GPU MiB':>13s} {'salient diff / moved':>21s}  non-training seconds"
    )
    for label, r in runs.items():
        tps = r["tokens_per_second"]
        weak = tps / per_gpu if per_gpu else float("nan")
        strong = tps / one if one else float("nan")
        rel = ""
        if "salient_rel_l2_diff_vs_one" in r:
            rel = f"{r['salient_rel_l2_diff_vs_one']:.3f}"
        st = r["stage_seconds"]
        overhead = st["total"] - st.get("train", 0.0) - st.get("load", 0.0)
        print(
            f"{label:8s} {tps:10.0f} {weak:8.2f} {strong:7.2f} {r['seconds_per_step']:7.3f}"
            f" {r['peak_gpu_mb_rank0']:13.0f} {rel:>21s}  {overhead:.1f}"
        )
        print("         stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in st.items()))


if __name__ == "__main__":
    main()
