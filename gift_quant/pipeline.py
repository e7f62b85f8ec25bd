"""``recover``: load -> calibrate -> select salient columns -> quantize -> GIFT-SW -> export ->
evaluate before and after, with every stage's output kept so a rerun resumes.

Output directory::

    OUT/recipe.yaml        the resolved recipe (a rerun with another recipe is refused)
    OUT/quantized/         export of the quantized start (post mode)
    OUT/train/             checkpoints/ and metrics.jsonl
    OUT/model/             the recovered model (an export directory; ``eval OUT`` reads it)
    OUT/lora_adapter/      (train.method=lora) the PEFT adapter on top of OUT/quantized
    OUT/eval_*.json        cached perplexities
    OUT/report.json, OUT/report.md
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import yaml

from .data import eval_windows, load_documents, tokenize_documents
from .evaluate import bits_report, perplexity
from .export import save_quantized
from .gift_linear import attach_gift, detach_gift
from .load import load_quantized
from .modeling import load_model, resolve_device
from .quantize import quantize_model, select_salient_columns
from .recipe import Recipe, RecipeError, recipe_from_dict
from .train import train

log = logging.getLogger(__name__)

__all__ = ["final_model_dir", "recover", "report_table"]

QUANT_SECTIONS = ("model", "calib", "saliency", "quant")


def _check_recipe(out: Path, recipe: Recipe) -> None:
    path = out / "recipe.yaml"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(recipe.to_yaml())
        return
    old = recipe_from_dict(yaml.safe_load(path.read_text()) or {})
    if old != recipe:
        diff = [s for s in recipe.to_dict() if old.to_dict()[s] != recipe.to_dict()[s]]
        raise RecipeError(
            f"{out} holds a run with a different recipe (sections {diff} differ); "
            f"use a new --out directory to start another run"
        )


def _stage_matches(export_dir: Path, recipe: Recipe) -> bool:
    saved = yaml.safe_load((export_dir / "recipe.yaml").read_text()) or {}
    now = recipe.to_dict()
    return all(saved.get(s) == now[s] for s in QUANT_SECTIONS)


def _cached(path: Path, compute) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def recover(recipe: Recipe, out_dir: str | Path, progress: bool = True) -> dict:
    """Run (or resume) the whole recovery job; returns the report dict."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    _check_recipe(out, recipe)
    device = resolve_device(recipe.model.device)
    ev, tr = recipe.eval, recipe.train
    timings: dict[str, float] = {}

    model, tok = load_model(recipe.model)
    text = ev.text[0]
    windows = eval_windows(tokenize_documents(tok, load_documents(text)), ev.seq_len, ev.max_tokens)

    def ppl(m, label):
        r = perplexity(
            m,
            windows,
            ev.batch_size,
            device,
            getattr(torch, ev.dtype),
            progress,
            desc=f"ppl {label}",
        )
        log.info("%s perplexity on %s: %.3f (%d tokens)", label, text, r["perplexity"], r["tokens"])
        return r

    fp = _cached(out / "eval_fp.json", lambda: {**ppl(model, "fp"), **bits_report(model)})
    teacher = None
    if tr.kd_weight > 0 and tr.method != "none":
        teacher, _ = load_model(
            recipe.model, dtype=torch.bfloat16 if tr.dtype != "float32" else None
        )
        teacher.to(device).eval().requires_grad_(False)

    eval_fn = None
    if tr.eval_every:
        eval_windows_small = windows[: max(1, tr.eval_tokens // ev.seq_len)]

        def eval_fn(m):
            r = perplexity(
                m,
                eval_windows_small,
                ev.batch_size,
                device,
                getattr(torch, ev.dtype),
                progress=False,
            )
            return {"perplexity": r["perplexity"], "tokens": r["tokens"]}

    fingerprint = {
        k: json.dumps(v, sort_keys=True) for k, v in recipe.to_dict().items() if k != "eval"
    }
    final = out / "model"
    quantized_report: dict = {}
    train_report: dict = {}
    if tr.mode == "post":
        qdir = out / "quantized"
        t0 = time.perf_counter()
        if (qdir / "config.json").is_file():
            if not _stage_matches(qdir, recipe):
                raise RecipeError(f"{qdir} was quantized with other settings; use a new --out")
            log.info("stage quantize: reusing %s", qdir)
            model = load_quantized(qdir)
            quantized_report = json.loads((qdir / "report.json").read_text())
        else:
            log.info(
                "stage quantize: %s w%d g%d",
                recipe.quant.method,
                recipe.quant.bits,
                recipe.quant.group_size,
            )
            rep = quantize_model(model, tok, recipe, progress=progress)
            quantized_report = {**rep.to_dict(), **bits_report(model)}
            save_quantized(
                model,
                qdir,
                tokenizer=tok,
                recipe=recipe,
                report=quantized_report,
                checkpoint_format=recipe.export.checkpoint_format,
            )
        timings["quantize"] = time.perf_counter() - t0
        quant = _cached(out / "eval_quantized.json", lambda: ppl(model, "quantized"))
        if tr.method == "none" or tr.steps == 0:
            final = qdir
        elif (final / "config.json").is_file() or (out / "lora_adapter").is_dir():
            log.info("stage train: done earlier")
        else:
            t0 = time.perf_counter()
            if tr.method == "gift":
                attach_gift(model, tr.noise, tr.noise_bits(recipe.quant.bits))
            else:
                from .baselines import attach_lora

                model, rank = attach_lora(model, tr.lora_rank, tr.lora_alpha, tr.seed)
                log.info("LoRA rank %d (trainable parameters matched to the salient columns)", rank)
            rep = train(
                model,
                tok,
                tr,
                out / "train",
                fingerprint=fingerprint,
                teacher=teacher,
                eval_fn=eval_fn,
                progress=progress,
                device=device,
            )
            train_report = rep.to_dict()
            timings["train"] = time.perf_counter() - t0
            (out / "train" / "report.json").write_text(json.dumps(train_report, indent=2) + "\n")
            model.to("cpu")
            if tr.method == "gift":
                detach_gift(model)
                save_quantized(
                    model,
                    final,
                    tokenizer=tok,
                    recipe=recipe,
                    checkpoint_format=recipe.export.checkpoint_format,
                )
            else:
                model.save_pretrained(out / "lora_adapter")
                final = out / "lora_adapter"
    else:  # pre: GIFT-SW on the FP model with quant.bits noise, then quantize
        quant = None
        if not (final / "config.json").is_file():
            t0 = time.perf_counter()
            salient = select_salient_columns(model, tok, recipe, progress=progress)
            attach_gift(model, tr.noise, tr.noise_bits(recipe.quant.bits), salient=salient)
            rep = train(
                model,
                tok,
                tr,
                out / "train",
                fingerprint=fingerprint,
                teacher=teacher,
                eval_fn=eval_fn,
                progress=progress,
                device=device,
            )
            train_report = rep.to_dict()
            timings["train"] = time.perf_counter() - t0
            (out / "train" / "report.json").write_text(json.dumps(train_report, indent=2) + "\n")
            model.to("cpu")
            detach_gift(model)
            t0 = time.perf_counter()
            rep = quantize_model(model, tok, recipe, progress=progress, salient=salient)
            quantized_report = {**rep.to_dict(), **bits_report(model)}
            timings["quantize"] = time.perf_counter() - t0
            save_quantized(
                model,
                final,
                tokenizer=tok,
                recipe=recipe,
                report=quantized_report,
                checkpoint_format=recipe.export.checkpoint_format,
            )

    if not train_report and (out / "train" / "report.json").is_file():
        train_report = json.loads((out / "train" / "report.json").read_text())
    recovered = _cached(
        out / "eval_recovered.json", lambda: ppl(_load_final(out, final, tr), "recovered")
    )
    report = _report(
        recipe,
        out,
        final,
        fp,
        quant,
        recovered,
        quantized_report,
        train_report,
        timings,
        time.perf_counter() - t_start,
    )
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_table(report) + "\n")
    return report


def final_model_dir(path: Path) -> Path:
    """The export directory inside a recover output directory (or ``path`` itself)."""
    for sub in ("model", "quantized"):
        if (path / sub / "config.json").is_file() and not (path / "config.json").is_file():
            return path / sub
    return path


def _load_final(out: Path, final: Path, tr):
    if final.name == "lora_adapter":
        from .baselines import load_lora

        return load_lora(load_quantized(out / "quantized"), final)
    return load_quantized(final)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def _report(recipe, out, final, fp, quant, recovered, qrep, trep, timings, seconds) -> dict:
    q, tr = recipe.quant, recipe.train
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
        "bits_per_weight": qrep.get("bits_per_weight"),
        "bytes_fp16": fp.get("model_bytes"),
        "bytes_export": _dir_bytes(final) if final.is_dir() else None,
        "train": trep,
        "seconds": {**timings, "total": seconds},
    }


def report_table(r: dict) -> str:
    """A readable markdown table of a recover report."""

    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    def mib(n):
        return None if n is None else n / 2**20

    lines = [
        f"# gift_quant recover: {r['setting']}",
        "",
        f"held-out perplexity on {r['eval_text']} ({r['eval_tokens']} tokens)",
        "",
        "| model | bits/weight | perplexity | size (MiB) |",
        "|---|---:|---:|---:|",
        f"| FP16 | 16 | {f(r['perplexity_fp'])} | {f(mib(r['bytes_fp16']), '{:.1f}')} |",
        f"| quantized | {f(r['bits_per_weight'])} | {f(r['perplexity_quantized'])} | |",
        f"| recovered | {f(r['bits_per_weight'])} | {f(r['perplexity_recovered'])} | "
        f"{f(mib(r['bytes_export']), '{:.1f}')} |",
        "",
    ]
    t = r.get("train") or {}
    if t:
        lines.append(
            f"training: {t.get('steps')} steps, {t.get('tokens')} tokens, "
            f"{f(t.get('seconds_per_step'), '{:.2f}')} s/step, "
            f"{f(t.get('tokens_per_second'), '{:.0f}')} tokens/s, "
            f"{t.get('trainable_params')} trainable parameters, "
            f"peak RSS {f(t.get('peak_rss_mb'), '{:.0f}')} MiB"
        )
    secs = ", ".join(f"{k} {v:.0f}s" for k, v in r["seconds"].items())
    lines.append(f"time: {secs}")
    return "\n".join(lines)
