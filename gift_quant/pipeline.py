"""``recover``: load -> calibrate -> select salient columns -> quantize -> GIFT-SW -> export ->
evaluate before and after, with every stage's output kept so a rerun resumes.

Output directory::

    OUT/recipe.yaml        the resolved recipe (a rerun with another recipe is refused)
    OUT/quantized/         export of the quantized start (post mode)
    OUT/train/             checkpoints/ and metrics.jsonl
    OUT/model/             the recovered model (an export directory; ``eval OUT`` reads it)
    OUT/lora_adapter/      (train.method=lora or dora) the PEFT adapter on top of OUT/quantized
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
from safetensors.torch import load_file

from gift_quant.data import eval_windows, load_documents, tokenize_documents
from gift_quant.evaluate import bits_report, perplexity
from gift_quant.io.export import save_quantized
from gift_quant.io.load import load_quantized
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import load_model, resolve_device
from gift_quant.quantize import quantize_model, select_salient_columns
from gift_quant.recipe import Recipe, RecipeError, recipe_from_dict
from gift_quant.train import distributed
from gift_quant.train.checkpoint import latest_checkpoint
from gift_quant.train.gift_linear import attach_gift, detach_gift
from gift_quant.train.loop import train

log = logging.getLogger(__name__)

__all__ = ["final_model_dir", "recover", "report_table"]

QUANT_SECTIONS = ("model", "calib", "saliency", "quant")
ADAPTERS = ("lora", "dora")  # train.method values that save a PEFT adapter, not a model


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


class _Run:
    """What every stage of one recover run shares: recipe, output dir, eval data, device and
    process group."""

    def __init__(self, recipe: Recipe, out: Path, progress: bool) -> None:
        self.recipe, self.out, self.progress = recipe, out, progress
        base = resolve_device(recipe.model.device)
        self.dist = distributed.init(base)
        self.device = distributed.rank_device(self.dist, base)
        self.timings: dict[str, float] = {}
        self.fingerprint = {
            k: json.dumps(v, sort_keys=True) for k, v in recipe.to_dict().items() if k != "eval"
        }

    def load_text(self, tok) -> None:
        ev = self.recipe.eval
        tokens = tokenize_documents(tok, load_documents(ev.text[0]))
        self.windows = eval_windows(tokens, ev.seq_len, ev.max_tokens)

    def ppl(self, model, label: str, windows=None, progress=None) -> dict:
        ev = self.recipe.eval
        r = perplexity(
            model,
            self.windows if windows is None else windows,
            ev.batch_size,
            self.device,
            getattr(torch, ev.dtype),
            self.progress if progress is None else progress,
            desc=f"ppl {label}",
        )
        log.info("%s perplexity: %.3f (%d tokens)", label, r["perplexity"], r["tokens"])
        return r

    def cached(self, name: str, compute) -> dict:
        """Rank 0 computes and stores ``eval_<name>.json`` once; every rank reads it."""
        path = self.out / f"eval_{name}.json"
        if self.dist.main and not path.is_file():
            path.write_text(json.dumps(compute(), indent=2) + "\n")
        self.dist.barrier()
        return json.loads(path.read_text())

    def eval_fn(self):
        tr = self.recipe.train
        if not tr.eval_every:
            return None
        small = self.windows[: max(1, tr.eval_tokens // self.recipe.eval.seq_len)]

        def evaluate(model):
            r = self.ppl(model, "train", small, progress=False)
            return {"perplexity": r["perplexity"], "tokens": r["tokens"]}

        return evaluate

    def train(self, model, tok, teacher):
        """The training stage of either mode, into ``out/train`` (resumes its checkpoints)."""
        return train(
            model,
            tok,
            self.recipe.train,
            self.out / "train",
            fingerprint=self.fingerprint,
            teacher=teacher,
            eval_fn=self.eval_fn(),
            progress=self.progress,
            device=self.device,
            dist=self.dist,
        )


def recover(recipe: Recipe, out_dir: str | Path, progress: bool = True) -> dict | None:
    """Run (or resume) the whole recovery job; returns the report dict (None on the ranks
    other than 0 of a multi-process run)."""
    t_start = time.perf_counter()
    run = _Run(recipe, Path(out_dir), progress)
    d, tr = run.dist, recipe.train
    if d.enabled and (tr.mode == "pre" or (tr.parallel == "fsdp" and tr.method in ADAPTERS)):
        raise RecipeError(
            "several processes run post-mode gift (ddp or fsdp) or lora/dora (ddp); "
            "run train.mode=pre in one process"
        )
    if d.main:
        _check_recipe(run.out, recipe)
    d.barrier()
    model, tok = load_model(recipe.model)
    run.load_text(tok)
    fp = run.cached("fp", lambda: {**run.ppl(model, "fp"), **bits_report(model)})
    teacher = None
    if tr.kd_weight > 0 and tr.method != "none":
        dtype = None if tr.dtype == "float32" else torch.bfloat16
        teacher, _ = load_model(recipe.model, dtype=dtype)
        teacher.to(run.device).eval().requires_grad_(False)

    if tr.mode == "post":
        model, quantized_report = _quantize_stage(run, model, tok)
        quant = run.cached("quantized", lambda: run.ppl(model, "quantized"))
        final, train_report = _train_post(run, model, tok, teacher)
    else:
        quant = None
        final, train_report, quantized_report = _pre(run, model, tok, teacher)
    recovered = run.cached("recovered", lambda: run.ppl(_load_final(run.out, final), "recovered"))
    d.close()
    if not d.main:
        return None
    report = _report(
        recipe,
        run.out,
        final,
        fp,
        quant,
        recovered,
        quantized_report,
        train_report,
        run.timings,
        time.perf_counter() - t_start,
    )
    (run.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (run.out / "report.md").write_text(report_table(report) + "\n")
    return report


def _quantize_stage(run: _Run, model, tok):
    """The quantized start in OUT/quantized (rank 0 makes it once; every rank loads it)."""
    recipe, qdir = run.recipe, run.out / "quantized"
    t0 = time.perf_counter()
    made_here = False
    if run.dist.main and not (qdir / "config.json").is_file():
        q = recipe.quant
        log.info("stage quantize: %s w%d g%d", q.method, q.bits, q.group_size)
        rep = quantize_model(model, tok, recipe, progress=run.progress)
        save_quantized(
            model,
            qdir,
            tokenizer=tok,
            recipe=recipe,
            report={**rep.to_dict(), **bits_report(model)},
            checkpoint_format=recipe.export.checkpoint_format,
        )
        made_here = True
    run.dist.barrier()
    if not _stage_matches(qdir, recipe):
        raise RecipeError(f"{qdir} was quantized with other settings; use a new --out")
    if not made_here:
        log.info("stage quantize: loading %s", qdir)
        model = load_quantized(qdir)
    run.timings["quantize"] = time.perf_counter() - t0
    return model, json.loads((qdir / "report.json").read_text())


def _train_post(run: _Run, model, tok, teacher) -> tuple[Path, dict]:
    recipe, tr, out = run.recipe, run.recipe.train, run.out
    if tr.method == "none" or tr.steps == 0:
        return out / "quantized", {}
    final = out / ("lora_adapter" if tr.method in ADAPTERS else "model")
    report_file = out / "train" / "report.json"
    if (final / "config.json").is_file() or (final / "adapter_config.json").is_file():
        log.info("stage train: done earlier")
        return final, json.loads(report_file.read_text())
    t0 = time.perf_counter()
    if tr.method == "gift":
        attach_gift(model, tr.noise, tr.noise_bits(recipe.quant.bits))
    else:
        from gift_quant.train.lora import attach_lora

        dora = tr.method == "dora"
        model, rank = attach_lora(model, tr.lora_rank, tr.lora_alpha, tr.seed, dora=dora)
        log.info("%s rank %d", tr.method, rank)
    rep = run.train(model, tok, teacher)
    run.timings["train"] = time.perf_counter() - t0
    if run.dist.main:
        report_file.write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
        model.to("cpu")
        if tr.method in ADAPTERS:
            model.save_pretrained(final)
        else:
            if run.dist.enabled:  # parameters may be sharded: rebuild from the full checkpoint
                model = load_quantized(out / "quantized")
                apply_salient_checkpoint(model, latest_checkpoint(out / "train" / "checkpoints"))
            else:
                detach_gift(model)
            save_quantized(
                model,
                final,
                tokenizer=tok,
                recipe=recipe,
                checkpoint_format=recipe.export.checkpoint_format,
            )
    run.dist.barrier()
    return final, rep.to_dict()


def _pre(run: _Run, model, tok, teacher) -> tuple[Path, dict, dict]:
    """Pre mode: GIFT-SW on the FP model with quant.bits noise, then quantize."""
    recipe, tr, out = run.recipe, run.recipe.train, run.out
    final = out / "model"
    if (final / "config.json").is_file():
        train_report = json.loads((out / "train" / "report.json").read_text())
        return final, train_report, json.loads((final / "report.json").read_text())
    t0 = time.perf_counter()
    salient = select_salient_columns(model, tok, recipe, progress=run.progress)
    attach_gift(model, tr.noise, tr.noise_bits(recipe.quant.bits), salient=salient)
    rep = run.train(model, tok, teacher)  # one process: pre mode refuses several
    run.timings["train"] = time.perf_counter() - t0
    (out / "train" / "report.json").write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
    model.to("cpu")
    detach_gift(model)
    t0 = time.perf_counter()
    qrep = quantize_model(model, tok, recipe, progress=run.progress, salient=salient)
    quantized_report = {**qrep.to_dict(), **bits_report(model)}
    run.timings["quantize"] = time.perf_counter() - t0
    save_quantized(
        model,
        final,
        tokenizer=tok,
        recipe=recipe,
        report=quantized_report,
        checkpoint_format=recipe.export.checkpoint_format,
    )
    return final, rep.to_dict(), quantized_report


def apply_salient_checkpoint(model, checkpoint: Path) -> None:
    """Set every MixedLinear's salient columns from a training checkpoint (fp32 -> fp16)."""
    trained = load_file(checkpoint / "trainable.safetensors")
    for name, module in model.named_modules():
        key = f"{name}.salient_weight"
        if isinstance(module, MixedLinear) and key in trained:
            module.salient_weight = trained[key].to(torch.float16)


def final_model_dir(path: Path) -> Path:
    """The export directory inside a recover output directory (or ``path`` itself)."""
    for sub in ("model", "quantized"):
        if (path / sub / "config.json").is_file() and not (path / "config.json").is_file():
            return path / sub
    return path


def _load_final(out: Path, final: Path):
    if final.name == "lora_adapter":
        from gift_quant.train.lora import load_lora

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
        "bytes_quantized": _dir_bytes(out / "quantized") if (out / "quantized").is_dir() else None,
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
        f"| quantized | {f(r['bits_per_weight'])} | {f(r['perplexity_quantized'])} | "
        f"{f(mib(r.get('bytes_quantized')), '{:.1f}')} |",
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
