"""Multi-GPU recovery: throughput and peak memory of GIFT-SW on 1 GPU vs 2 GPUs (DDP, FSDP).

    python tools/bench_distributed.py [--gpus 2] [--steps 12] [--out DIR]
    python tools/bench_distributed.py --tiny --cpu     # the same flow on CPU processes (gloo)

A 1.1B-parameter Llama (TinyLlama-1.1B shape) with random weights, RTN w4 g128 + 128 salient
columns, quantized once on one device; then the same `python -m gift_quant recover` runs on
1 process and, under torchrun, on N processes with train.parallel=ddp and =fsdp, with the same
global batch. Text: a synthetic corpus written here (the machine has no network and no
embedded text), tokenized by a byte-level BPE trained on it -- this is a throughput benchmark,
not a quality one. Prints a table; writes bench_distributed.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def synthetic_text(path: Path, n_words: int = 200_000) -> None:
    rng = random.Random(0)
    syll = ["ka", "lo", "mi", "ren", "to", "sa", "vu", "ne", "di", "por", "el", "an", "ru", "qi"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(words))
        if len(line) > rng.randint(8, 20):
            lines.append(" ".join(line) + ".")
            line = []
    path.write_text("\n".join(lines))


def build_model(work: Path, tiny: bool, device: str) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = work / "text.txt"
    synthetic_text(text, 20_000 if tiny else 200_000)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512 if tiny else 4096,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(text)], trainer)
    if tiny:
        cfg = LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    else:  # TinyLlama-1.1B
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.float16)
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>"
    ).save_pretrained(model_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e9:.2f}B parameters", flush=True)
    return model_dir


def recover(cmd_prefix: list[str], recipe: Path, out: Path, sets: list[str]) -> dict:
    cmd = [
        *cmd_prefix,
        "-m",
        "gift_quant",
        "recover",
        "--recipe",
        str(recipe),
        "--out",
        str(out),
        "--json",
        "-q",
    ]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tools'}"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        print(proc.stdout[-2000:], proc.stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--work", default="/tmp/bench_distributed")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks/results")))
    args = p.parse_args()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    device = "cpu" if args.cpu else "cuda"
    model_dir = build_model(work, args.tiny, device)
    text = work / "text.txt"
    recipe = work / "recipe.yaml"
    recipe.write_text(f"""
model: {{name_or_path: {model_dir}, device: {device}, dtype: float16}}
calib: {{source: {text}, num_samples: 8, seq_len: 256, batch_size: 4, true_sequential: false}}
saliency: {{metric: gift, count: {8 if args.tiny else 128}}}
quant: {{method: rtn, bits: 4, group_size: {32 if args.tiny else 128}}}
train: {{method: gift, mode: post, data: {text}, steps: {args.steps}, batch_size: {args.batch},
        grad_accum: 1, seq_len: {args.seq}, lr: 1.0e-4, save_every: 0,
        dtype: {"float32" if args.cpu else "bfloat16"}}}
eval: {{text: [{text}], seq_len: 256, max_tokens: 1024, batch_size: 4,
       dtype: {"float32" if args.cpu else "bfloat16"}}}
""")
    py = [sys.executable]
    base = work / "base"
    t0 = time.perf_counter()
    recover(py, recipe, base, ["train.steps=0"])  # quantized start, once
    print(f"quantized start in {time.perf_counter() - t0:.0f}s", flush=True)
    runs = {}
    for label, nproc, parallel in [
        ("1 process", 1, "ddp"),
        (f"{args.gpus}x DDP", args.gpus, "ddp"),
        (f"{args.gpus}x FSDP", args.gpus, "fsdp"),
    ]:
        out = work / label.replace(" ", "_")
        out.mkdir()
        shutil.copytree(base / "quantized", out / "quantized")
        for f in ("eval_fp.json", "eval_quantized.json"):
            shutil.copy(base / f, out / f)
        prefix = (
            py
            if nproc == 1
            else [*py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        )
        r = recover(prefix, recipe, out, [f"train.parallel={parallel}"])
        t = r["train"]
        runs[label] = {
            "processes": nproc,
            "parallel": parallel,
            "tokens_per_second": t["tokens_per_second_steady"],
            "peak_gpu_mb_rank0": t["peak_gpu_mb"],
            "peak_rss_mb_rank0": t["peak_rss_mb"],
            "seconds_per_step": t["seconds_per_step"],
            "perplexity_recovered": r["perplexity_recovered"],
            "wall_seconds": r["wall_seconds"],
        }
        print(label, json.dumps(runs[label]), flush=True)
    one = runs["1 process"]["tokens_per_second"]
    print(f"\n{'run':12s} {'tokens/s':>10s} {'scaling':>8s} {'peak GPU MiB':>13s} {'ppl':>9s}")
    for label, r in runs.items():
        r["scaling"] = r["tokens_per_second"] / one
        print(
            f"{label:12s} {r['tokens_per_second']:10.0f} {r['scaling']:8.2f} "
            f"{r['peak_gpu_mb_rank0']:13.0f} {r['perplexity_recovered']:9.3f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distributed.json").write_text(
        json.dumps(
            {
                "model": "tiny" if args.tiny else "TinyLlama-1.1B shape, random weights",
                "setting": "RTN w4 g128 + 128 salient, GIFT-SW post",
                "steps": args.steps,
                "global_batch": args.batch,
                "seq_len": args.seq,
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
