"""``recover``: load -> calibrate -> select salient columns -> quantize -> GIFT-SW -> export ->
evaluate before and after, with every stage's output kept so a rerun resumes.

Output directory::

    OUT/recipe.yaml        the resolved recipe (a rerun with another recipe is refused, but
                           for new training settings before the first checkpoint)
    OUT/quantized/         export of the quantized start (post mode)
    OUT/train/             checkpoints/ and metrics.jsonl
    OUT/model/             the recovered model (an export directory; ``eval OUT`` reads it)
    OUT/lora_adapter/      (train.method=lora or dora) the PEFT adapter on top of OUT/quantized
    OUT/eval_*.json        cached perplexities
    OUT/timings.json       seconds of every invocation and stage (a resumed run counts them all)
    OUT/report.json, OUT/report.md   written once, when the run finishes; a rerun returns them

Everything that can be checked without loading weights -- device, output directory, model,
every target Linear's shape against the group size and salient budget, context lengths -- is
checked by :func:`validate` before anything is written to OUT, so a run refused there leaves
nothing behind and the corrected rerun just works.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from gift_quant.data import load_eval_windows
from gift_quant.evaluate import bits_report, perplexity
from gift_quant.files import write_text_atomic
from gift_quant.io.export import atomic_directory, save_quantized
from gift_quant.io.load import load_quantized
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import load_model, resolve_device
from gift_quant.quantize import quantize_model, select_salient_columns
from gift_quant.recipe import Recipe, RecipeError, recipe_from_dict
from gift_quant.run_report import build_report, record_invocation, report_table, whole_run_train
from gift_quant.train import distributed
from gift_quant.train.checkpoint import latest_checkpoint
from gift_quant.train.data import check_train_file, resolve_generated
from gift_quant.train.distributed import rank0
from gift_quant.train.gift_linear import attach_gift, detach_gift
from gift_quant.train.loop import train
from gift_quant.train.norms import TrainedNorms
from gift_quant.validation import (
    check_finite_weights,
    comparable,
    finished_run,
    recipe_conflict,
    validate,
    without_runtime_keys,
)

log = logging.getLogger(__name__)

__all__ = ["apply_salient_checkpoint", "recover"]

QUANT_SECTIONS = ("model", "calib", "saliency", "quant")
ADAPTERS = ("lora", "dora")  # train.method values that save a PEFT adapter, not a model


STALE_FILES = ("report.json", "report.md", "train/metrics.jsonl")


def _check_recipe(out: Path, recipe: Recipe) -> None:
    """Record the recipe in OUT (after validation); a replaced recipe drops cached evals."""
    conflict = recipe_conflict(out, recipe)
    if conflict:
        raise RecipeError(conflict)
    path = out / "recipe.yaml"
    if path.is_file() and path.read_text() == recipe.to_yaml():
        return
    out.mkdir(parents=True, exist_ok=True)
    if path.is_file() and not _same_result(path, recipe):
        # computed under the replaced recipe: cached evaluations, the report, partial metrics
        for stale in (*out.glob("eval_*.json"), *(out / n for n in STALE_FILES)):
            stale.unlink(missing_ok=True)
    write_text_atomic(path, recipe.to_yaml())


def _same_result(path: Path, recipe: Recipe) -> bool:
    """Whether the recipe saved at ``path`` differs from ``recipe`` only in runtime keys."""
    try:
        old = recipe_from_dict(yaml.safe_load(path.read_text()) or {})
    except (RecipeError, yaml.YAMLError):
        return False
    return comparable(old) == comparable(recipe)


def _stage_matches(export_dir: Path, recipe: Recipe) -> bool:
    """Whether a saved quantized model was made with this recipe's model/calib/saliency/quant
    settings. The saved recipe is re-read with today's defaults (as checkpoint fingerprints
    are), so a key added since, at its default, does not make an old start "different"."""
    raw = yaml.safe_load((export_dir / "recipe.yaml").read_text()) or {}
    try:
        saved = comparable(recipe_from_dict(raw))
    except (RecipeError, ValueError, TypeError, AttributeError):
        saved = without_runtime_keys(raw)
    now = comparable(recipe)
    return all(saved.get(s) == now[s] for s in QUANT_SECTIONS)


class _Run:
    """What every stage of one recover run shares: recipe, output dir, eval data, device and
    process group."""

    def __init__(self, recipe: Recipe, out: Path, progress: bool) -> None:
        self.recipe, self.out, self.progress = recipe, out, progress
        base = resolve_device(recipe.model.device)
        self.dist = distributed.init(base, recipe.train.dist_timeout_s)
        self.device = distributed.rank_device(self.dist, base)
        if self.device.type == "cuda":  # cuda:1's allocator (peak-memory stats) needs the init
            torch.cuda.init()
        self.timings: dict[str, float] = {}
        self.peak_gpu_mb: dict[str, float] = {}
        self.train_cfg = recipe.train  # train.data=generated:N becomes its cache directory
        self.fingerprint = fingerprint(recipe)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time one stage (seconds and, on a GPU, peak memory go into report.json); collectives
        that fail inside it name it."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.dist.stage = name
        t0 = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.peak_gpu_mb[name] = max(self.peak_gpu_mb.get(name, 0.0), peak)

    def load_text(self, tok) -> None:
        """Every eval text's windows; the first text's also serve the evaluations in training."""
        ev = self.recipe.eval
        self.texts = {
            t: load_eval_windows(tok, t, ev.seq_len, ev.max_tokens, ev.bos) for t in ev.text
        }
        self.windows = self.texts[ev.text[0]]

    def ppl_texts(self, model, label: str) -> dict:
        """Perplexity on the first eval text (the result's own keys) and on each eval text
        (under "texts")."""
        many = len(self.texts) > 1
        each = {
            t: self.ppl(model, f"{label} {t}" if many else label, w) for t, w in self.texts.items()
        }
        return {**each[self.recipe.eval.text[0]], "texts": each}

    def ppl(self, model, label: str, windows=None, progress=None, training=False) -> dict:
        ev = self.recipe.eval
        r = perplexity(
            model,
            self.windows if windows is None else windows,
            ev.batch_size,
            self.device,
            getattr(torch, ev.dtype),
            self.progress if progress is None else progress,
            desc=f"ppl {label}",
            keep_trainable=training,
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
            r = self.ppl(model, "train", small, progress=False, training=True)
            return {"perplexity": r["perplexity"], "tokens": r["tokens"]}

        return evaluate

    def train(self, model, tok, teacher):
        """The training stage of either mode, into ``out/train`` (resumes its checkpoints)."""
        return train(
            model,
            tok,
            self.train_cfg,
            self.out / "train",
            fingerprint=self.fingerprint,
            fingerprint_upgrade=upgrade_fingerprint,
            teacher=teacher,
            eval_fn=self.eval_fn(),
            progress=self.progress,
            device=self.device,
            dist=self.dist,
        )


def recover(recipe: Recipe, out_dir: str | Path, progress: bool = True) -> dict | None:
    """Run (or resume) the whole recovery job; returns the report dict (None on the ranks
    other than 0 of a multi-process run). A finished run's report is returned as it is."""
    out = Path(out_dir)
    t_start = time.perf_counter()
    # also converts the embedded model to its fp16 cache, on a machine's first run
    validate(recipe, out, new_out=False)
    checked = time.perf_counter() - t_start
    if finished_run(out, recipe):
        log.info("%s finished earlier; its report is kept", out)
        return json.loads((out / "report.json").read_text()) if rank0() else None
    try:
        return _recover(recipe, out, progress, t_start, checked)
    except BaseException:  # Ctrl-C, a kill by the scheduler, an error: count the time spent
        record_invocation(out, {}, time.perf_counter() - t_start)
        raise


def _recover(
    recipe: Recipe, out_dir: Path, progress: bool, t_start: float, checked: float
) -> dict | None:
    run = _Run(recipe, Path(out_dir), progress)
    run.timings["check"] = checked  # the recipe and model checks before any stage
    d, tr = run.dist, recipe.train
    if d.enabled and (tr.mode == "pre" or (tr.parallel == "fsdp" and tr.method in ADAPTERS)):
        raise RecipeError(
            "several processes run post-mode gift (ddp or fsdp) or lora/dora (ddp); "
            "run train.mode=pre in one process"
        )
    if d.main:
        _check_recipe(run.out, recipe)
    d.barrier()
    with run.stage("load"):
        model, tok = load_model(recipe.model)
        check_finite_weights(model, recipe.model.name_or_path or "the embedded model")
    with run.stage("generate_data" if tr.data.startswith("generated:") else "load"):
        # train.data=generated:N: sampled from the FP model (a no-op for other sources)
        run.train_cfg = resolve_generated(tr, model, tok, progress, run.dist, run.device)
    with run.stage("load"):
        run.load_text(tok)
        check_train_file(run.train_cfg, tok)
    with run.stage("eval_fp"):
        fp = run.cached("fp", lambda: {**run.ppl_texts(model, "fp"), **bits_report(model)})
    teacher = None
    if tr.kd_weight > 0 and tr.method != "none":
        with run.stage("load_teacher"):
            dtype = None if tr.dtype == "float32" else torch.bfloat16
            teacher, _ = load_model(recipe.model, dtype=dtype)
            teacher.to(run.device).eval().requires_grad_(False)

    if tr.mode == "post":
        with run.stage("quantize"):
            model, quantized_report = _quantize_stage(run, model, tok)
        with run.stage("eval_quantized"):
            quant = run.cached("quantized", lambda: run.ppl_texts(model, "quantized"))
        final, train_report = _train_post(run, model, tok, teacher)
    else:
        quant = None
        final, train_report, quantized_report = _pre(run, model, tok, teacher)
    with run.stage("eval_recovered"):
        recovered = run.cached(
            "recovered", lambda: run.ppl_texts(_load_final(run.out, final), "recovered")
        )
    d.close()
    if not d.main:
        return None
    ledger = record_invocation(run.out, run.timings, time.perf_counter() - t_start)
    report = build_report(
        recipe,
        run.out,
        final,
        fp,
        quant,
        recovered,
        quantized_report,
        whole_run_train(run.out / "train", train_report),
        ledger,
        run.peak_gpu_mb,
    )
    write_text_atomic(run.out / "report.md", report_table(report) + "\n")
    write_text_atomic(run.out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def _quantize_stage(run: _Run, model, tok):
    """The quantized start in OUT/quantized (rank 0 makes it once; every rank loads it)."""
    recipe, qdir = run.recipe, run.out / "quantized"
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
    with run.stage("train_setup"):
        # on the training device first: the noise scales are computed where the layer lives
        model.to(run.device)
        norms = None
        if tr.method == "gift":
            attach_gift(model, tr.noise, tr.noise_bits(recipe.quant.bits))
            if tr.norms:
                norms = TrainedNorms(model)
        else:
            from gift_quant.train.lora import attach_lora

            dora = tr.method == "dora"
            model, rank = attach_lora(model, tr.lora_rank, tr.lora_alpha, tr.seed, dora=dora)
            log.info(
                "%s rank %d (trainable parameters matched to the salient columns)", tr.method, rank
            )
    with run.stage("train"):
        rep = run.train(model, tok, teacher)
        if norms is not None:
            norms.finish()
    with run.stage("export"):
        if run.dist.main:
            report_file.write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
            model.to("cpu")
            if tr.method in ADAPTERS:
                with atomic_directory(final) as tmp:  # the usual modes; never half an adapter
                    model.save_pretrained(tmp)
            else:
                if run.dist.enabled:  # parameters may be sharded: rebuild from the checkpoint
                    model = load_quantized(out / "quantized")
                    apply_salient_checkpoint(
                        model, latest_checkpoint(out / "train" / "checkpoints")
                    )
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
    with run.stage("saliency"):
        salient = select_salient_columns(model, tok, recipe, progress=run.progress)
    with run.stage("train_setup"):
        model.to(run.device)
        attach_gift(model, tr.noise, tr.noise_bits(recipe.quant.bits), salient=salient)
        norms = TrainedNorms(model) if tr.norms else None
    with run.stage("train"):
        rep = run.train(model, tok, teacher)  # one process: pre mode refuses several
        if norms is not None:
            norms.finish()
    (out / "train" / "report.json").write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
    model.to("cpu")
    detach_gift(model)
    with run.stage("quantize"):
        qrep = quantize_model(model, tok, recipe, progress=run.progress, salient=salient)
        quantized_report = {**qrep.to_dict(), **bits_report(model)}
    with run.stage("export"):
        save_quantized(
            model,
            final,
            tokenizer=tok,
            recipe=recipe,
            report=quantized_report,
            checkpoint_format=recipe.export.checkpoint_format,
        )
    return final, rep.to_dict(), quantized_report


def fingerprint(recipe: Recipe) -> dict:
    """What a training checkpoint records of the recipe: every section but eval, without the
    keys a rerun may change (see validation.comparable)."""
    return {k: json.dumps(v, sort_keys=True) for k, v in comparable(recipe).items() if k != "eval"}


def upgrade_fingerprint(stored: dict) -> dict:
    """A checkpoint's fingerprint as this version writes it: its sections re-read with today's
    defaults, so a key added since (at its default) does not stop a resume."""
    try:
        return fingerprint(recipe_from_dict({k: json.loads(v) for k, v in stored.items()}))
    except (RecipeError, ValueError, TypeError, AttributeError):
        return stored


def apply_salient_checkpoint(model, checkpoint: Path) -> None:
    """Set every MixedLinear's salient columns (fp32 -> fp16), and the norms where they trained
    (fp32 -> their own dtype), from a training checkpoint."""
    trained = load_file(checkpoint / "trainable.safetensors")
    for name, module in model.named_modules():
        key = f"{name}.salient_weight"
        if isinstance(module, MixedLinear) and key in trained:
            module.salient_weight = trained[key].to(torch.float16)
    params = dict(model.named_parameters())
    for key, value in trained.items():
        if key in params:  # train.norms
            params[key].data = value.to(params[key].dtype)


def _load_final(out: Path, final: Path):
    if final.name == "lora_adapter":
        from gift_quant.train.lora import load_lora

        return load_lora(load_quantized(out / "quantized"), final)
    return load_quantized(final)
