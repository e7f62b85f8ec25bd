"""What a finished ``recover`` run reports: the per-invocation time ledger (OUT/timings.json),
training figures counted over the whole run when it was resumed, and report.json / report.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from gift_quant.files import write_text_atomic
from gift_quant.train.distributed import rank0

__all__ = ["build_report", "dir_bytes", "record_invocation", "report_table", "whole_run_train"]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def record_invocation(out: Path, stage_seconds: dict, seconds: float) -> dict:
    """Add one invocation (and the stages it ran) to OUT/timings.json; return the ledger."""
    path = out / "timings.json"
    if not out.is_dir() or not rank0():
        return {"invocations": [seconds], "stages": dict(stage_seconds)}
    ledger = json.loads(path.read_text()) if path.is_file() else {"invocations": [], "stages": {}}
    ledger["invocations"].append(seconds)
    for stage, t in stage_seconds.items():
        ledger["stages"][stage] = ledger["stages"].get(stage, 0.0) + t
    write_text_atomic(path, json.dumps(ledger, indent=1) + "\n")
    return ledger


def whole_run_train(train_dir: Path, rep: dict) -> dict:
    """A resumed training report counts only its own steps; count steps, tokens and time over
    the whole run from metrics.jsonl (one row per step logged; a step redone after a resume
    counts its tokens once and its time every time it ran)."""
    if not rep or not rep.get("resumed_from"):
        return rep
    rows = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = {row["step"]: row["tokens"] for row in rows}
    if len(tokens) < rep["steps"]:  # log_every > 1: not every step has a row
        return {**rep, "counts": f"steps {rep['resumed_from'] + 1}-{rep['steps']} only"}
    seconds = sum(row["seconds"] for row in rows)
    total = sum(tokens.values())
    return {
        **rep,
        "tokens": total,
        "seconds": seconds,
        "seconds_per_step": seconds / rep["steps"],
        "tokens_per_second": total / seconds,
        "counts": "whole run",
    }


def export_bytes(out: Path, final: Path) -> tuple[int | None, int | None]:
    """(bytes of what a user deploys, bytes of the adapter or None). A LoRA/DoRA run's final
    directory is only the adapter; it is served on top of OUT/quantized, so the deployable size
    is the two together (None when OUT/quantized is missing)."""
    if not final.is_dir():
        return None, None
    if not (final / "adapter_config.json").is_file():
        return dir_bytes(final), None
    adapter = dir_bytes(final)
    base = out / "quantized"
    return (dir_bytes(base) + adapter if base.is_dir() else None), adapter


def build_report(recipe, out, final, fp, quant, recovered, qrep, trep, ledger, peak_gpu_mb) -> dict:
    q, tr = recipe.quant, recipe.train
    runs = ledger["invocations"]
    bytes_export, bytes_adapter = export_bytes(out, final)
    return {
        "command": "recover",
        "out": str(out),
        "model_dir": str(final),
        "model": recipe.model.name_or_path or "embedded:SmolLM2-135M-Instruct",
        "setting": f"{q.method} w{q.bits} g{q.group_size} {'sym' if q.sym else 'asym'}, "
        f"{recipe.saliency.metric} salient; {tr.method} {tr.mode}"
        + (f" noise={tr.noise}" if tr.method == "gift" else ""),
        "eval_text": recipe.eval.text[0],
        "perplexity_fp": fp["perplexity"],
        "perplexity_quantized": quant["perplexity"] if quant else None,
        "perplexity_recovered": recovered["perplexity"],
        "eval_tokens": recovered["tokens"],
        # every eval text (a run from before texts were kept per text: the first only)
        "eval_texts": {
            t: {
                "fp": fp["texts"][t]["perplexity"],
                "quantized": quant["texts"][t]["perplexity"] if quant else None,
                "recovered": r["perplexity"],
                "tokens": r["tokens"],
            }
            for t, r in recovered["texts"].items()
        }
        if "texts" in recovered and "texts" in fp and (quant is None or "texts" in quant)
        else None,
        "bits_per_weight": qrep.get("bits_per_weight"),
        "bytes_fp16": fp.get("model_bytes"),
        "bytes_quantized": dir_bytes(out / "quantized") if (out / "quantized").is_dir() else None,
        "bytes_export": bytes_export,  # deployable: with an adapter, quantized + adapter
        "bytes_adapter": bytes_adapter,
        "train": trep,
        "invocations": len(runs),
        "resumed": len(runs) > 1,
        "seconds": {**ledger["stages"], "total": sum(runs)},
        "peak_gpu_mb": peak_gpu_mb or None,
    }


def report_table(r: dict) -> str:
    """A readable markdown table of a recover report."""

    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    def mib(n):
        return None if n is None else n / 2**20

    adapter = r.get("bytes_adapter")  # absent from reports written before it was recorded
    lines = [
        f"# gift_quant recover: {r['setting']}",
        "",
        *(
            [f"resumed run: {r['invocations']} invocations, counted over the whole run", ""]
            if r.get("resumed")
            else []
        ),
        f"held-out perplexity on {r['eval_text']} ({r['eval_tokens']} tokens)",
        "",
        "| model | bits/weight | perplexity | size (MiB) |",
        "|---|---:|---:|---:|",
        f"| FP16 | 16 | {f(r['perplexity_fp'])} | {f(mib(r['bytes_fp16']), '{:.1f}')} |",
        f"| quantized | {f(r['bits_per_weight'])} | {f(r['perplexity_quantized'])} | "
        f"{f(mib(r.get('bytes_quantized')), '{:.1f}')} |",
        f"| recovered{' (quantized + adapter)' if adapter is not None else ''} | "
        f"{f(r['bits_per_weight'])} | {f(r['perplexity_recovered'])} | "
        f"{f(mib(r['bytes_export']), '{:.1f}')} |",
        "",
    ]
    if adapter is not None:
        where = Path(r["model_dir"]).name
        lines += [f"adapter alone ({where}/): {adapter / 2**10:.1f} KiB", ""]
    others = r.get("eval_texts") or {}
    if len(others) > 1:
        lines += ["| text | tokens | FP16 | quantized | recovered |", "|---|---:|---:|---:|---:|"]
        for text, e in others.items():
            lines.append(
                f"| {text} | {e['tokens']} | {f(e['fp'])} | {f(e['quantized'])} | "
                f"{f(e['recovered'])} |"
            )
        lines.append("")
    t = r.get("train") or {}
    if t:
        lines.append(
            f"training: {t.get('steps')} steps, {t.get('tokens')} tokens, "
            f"{f(t.get('seconds_per_step'), '{:.2f}')} s/step, "
            f"{f(t.get('tokens_per_second'), '{:.0f}')} tokens/s, "
            f"{t.get('trainable_params')} trainable parameters, "
            f"peak RSS by the end of training {f(t.get('peak_rss_mb'), '{:.0f}')} MiB"
            + (f" (resumed at step {t['resumed_from']})" if t.get("resumed_from") else "")
        )
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in r["seconds"].items())
    lines.append(f"time: {secs}")
    if t.get("seconds_first_step") is not None:
        lines.append(
            f"train steps: first {t['seconds_first_step']:.2f}s (compilation, warm-up), "
            f"then {f(t.get('seconds_per_step_steady'), '{:.3f}')} s/step"
        )
    if r.get("peak_gpu_mb"):
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_gpu_mb"].items())
        lines.append(f"peak GPU MiB: {peaks}")
    return "\n".join(lines)
