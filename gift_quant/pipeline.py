"""``recover``: load -> calibrate -> select salient columns -> quantize -> GIFT-SW -> export ->
evaluate before and after, with every stage's output kept so a rerun resumes.

Output directory::

    OUT/recipe.yaml        the resolved recipe (a rerun with another recipe is refused)
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
import os
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from gift_quant.data import check_sources, load_eval_windows
from gift_quant.evaluate import bits_report, perplexity
from gift_quant.io.export import atomic_directory, save_quantized
from gift_quant.io.load import load_quantized
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import load_model, resolve_device
from gift_quant.quantize import check_targets, quantize_model, select_salient_columns
from gift_quant.recipe import Recipe, RecipeError, recipe_from_dict
from gift_quant.train import distributed
from gift_quant.train.checkpoint import latest_checkpoint
from gift_quant.train.data import resolve_generated
from gift_quant.train.gift_linear import attach_gift, detach_gift
from gift_quant.train.loop import train

log = logging.getLogger(__name__)

__all__ = [
    "check_device",
    "check_finite_weights",
    "recover",
    "report_table",
    "validate",
]

QUANT_SECTIONS = ("model", "calib", "saliency", "quant")
ADAPTERS = ("lora", "dora")  # train.method values that save a PEFT adapter, not a model


STAGE_OUTPUTS = ("quantized", "train", "model", "lora_adapter")


def _recipe_conflict(out: Path, recipe: Recipe) -> str | None:
    """Why ``out`` cannot hold this run (None when it can: new, same recipe, or no stage
    output yet -- a run refused or stopped before its first stage is simply restarted)."""
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a directory; give a directory path"
    path = out / "recipe.yaml"
    if not path.is_file():
        foreign = [p.name for p in out.iterdir() if not _run_entry(p.name)] if out.is_dir() else []
        if foreign:
            return (
                f"--out {out} holds files that are not a recover run ({foreign[0]!r}, ...); "
                f"use a new --out directory"
            )
        return None  # new, or seeded with stage outputs (a shared quantized start)
    try:
        old = recipe_from_dict(yaml.safe_load(path.read_text()) or {})
    except (RecipeError, yaml.YAMLError):
        old = None
    new = _comparable(recipe)
    old = None if old is None else _comparable(old)
    if old == new or not any((out / s).exists() for s in STAGE_OUTPUTS):
        return None
    diff = [s for s in new if old is None or old[s] != new[s]]
    return (
        f"{out} holds a run with a different recipe (sections {diff} differ); "
        f"use a new --out directory, or rerun with the recipe in {path}"
    )


def _run_entry(name: str) -> bool:
    """Whether a file name belongs to a recover output directory."""
    known = ("recipe.yaml", "timings.json", "report.json", "report.md", *STAGE_OUTPUTS)
    hidden = name.startswith(".")  # the temporary siblings of interrupted writes
    return hidden or name in known or (name.startswith("eval_") and name.endswith(".json"))


def _check_recipe(out: Path, recipe: Recipe) -> None:
    """Record the recipe in OUT (after validation); a replaced recipe drops cached evals."""
    conflict = _recipe_conflict(out, recipe)
    if conflict:
        raise RecipeError(conflict)
    path = out / "recipe.yaml"
    if path.is_file() and path.read_text() == recipe.to_yaml():
        return
    out.mkdir(parents=True, exist_ok=True)
    if path.is_file() and not _same_result(path, recipe):
        for stale in out.glob("eval_*.json"):  # computed under the replaced recipe
            stale.unlink()
    _write_text(path, recipe.to_yaml())


def _same_result(path: Path, recipe: Recipe) -> bool:
    """Whether the recipe saved at ``path`` differs from ``recipe`` only in runtime keys."""
    try:
        old = recipe_from_dict(yaml.safe_load(path.read_text()) or {})
    except (RecipeError, yaml.YAMLError):
        return False
    return _comparable(old) == _comparable(recipe)


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary sibling and rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_device(spec: str, key: str = "model.device") -> None:
    """A device string that parses and exists here (a RecipeError naming the fix if not)."""
    try:
        device = torch.device("cpu" if spec == "auto" else spec)
    except RuntimeError as exc:
        raise RecipeError(f"{key}={spec!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (device.index or 0) >= n:
            raise RecipeError(f"{key}={spec!r} but {n} CUDA device(s) are visible; use cpu or auto")
    elif device.type != "cpu":
        raise RecipeError(f"{key}={spec!r}: only cpu and cuda devices are supported")


def _writable(out: Path) -> None:
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise RecipeError(f"--out {out}: {parent} is not writable; choose another --out")


def meta_model(cfg):
    """The model's skeleton on the meta device (no weights read) from its config alone;
    a missing path, a directory without config.json or an unreachable hub id is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gift_quant import assets

    name = cfg.name_or_path or str(assets.default_model_dir())
    path = Path(name).expanduser()
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if path.suffix == ".gguf" or cfg.gguf_file:
        gguf = path if path.suffix == ".gguf" else path / cfg.gguf_file
        if not gguf.is_file():
            raise RecipeError(f"model {str(gguf)!r}: no such GGUF file")
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif local and not path.exists():
        raise RecipeError(
            f"model {name!r}: no such path; give a model directory, a .gguf file, "
            f"a hub id (with a network), or no --model for the embedded default"
        )
    elif local and not (path / "config.json").is_file():
        raise RecipeError(
            f"model {name!r}: no config.json there; give a Hugging Face model directory, "
            f"a .gguf file, a hub id, or no --model for the embedded default"
        )
    else:
        source = name
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        if local:
            raise RecipeError(f"model {name!r}: unreadable config ({exc})") from exc
        raise RecipeError(
            f"model {name!r}: could not load it from the hub (offline, or no such model); "
            f"download it first and give its local directory"
        ) from exc
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def check_finite_weights(model, name: str) -> None:
    """Refuse a model whose weights hold NaN or inf: nothing computed from it would mean
    anything (found right after loading, before calibration)."""
    for key, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RecipeError(
                f"model {name!r}: weight {key!r} holds NaN or inf; the model files are corrupt"
            )


def validate(recipe: Recipe, out: Path, *, new_out: bool) -> None:
    """Everything that can be refused before the first expensive stage, before OUT is written:
    device, output directory, model, every target Linear against the group size and salient
    budget, and the context lengths. ``new_out``: the ``quantize`` command, whose OUT must not
    exist and which neither trains nor evaluates."""
    from gift_quant.modeling import check_context

    check_device(recipe.model.device)
    if new_out and out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out directory or remove it")
    conflict = None if new_out else _recipe_conflict(out, recipe)
    if conflict:
        raise RecipeError(conflict)
    _writable(out)
    meta = meta_model(recipe.model)
    check_targets(meta, recipe.model, recipe.saliency, recipe.quant)
    check_context(meta, recipe.calib.seq_len, "calib.seq_len")
    if not new_out:
        check_context(meta, recipe.eval.seq_len, "eval.seq_len")
    if not new_out and recipe.train.method != "none" and recipe.train.steps > 0:
        check_context(meta, recipe.train.seq_len, "train.seq_len")
    if not new_out:  # quantize checks only its calibration source itself
        check_sources(recipe)


def _comparable(recipe: Recipe) -> dict:
    """The recipe as a dict without the keys that cannot change a result (timeouts, logging),
    so a rerun may change them and still resume."""
    d = recipe.to_dict()
    for key in recipe.train.RUNTIME_KEYS:
        d["train"].pop(key, None)
    return d


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
        self.dist = distributed.init(base, recipe.train.dist_timeout_s)
        self.device = distributed.rank_device(self.dist, base)
        self.timings: dict[str, float] = {}
        self.peak_gpu_mb: dict[str, float] = {}
        self.train_cfg = recipe.train  # train.data=generated:N becomes its cache directory
        self.fingerprint = {
            k: json.dumps(v, sort_keys=True) for k, v in _comparable(recipe).items() if k != "eval"
        }

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
        ev = self.recipe.eval
        self.windows = load_eval_windows(tok, ev.text[0], ev.seq_len, ev.max_tokens, ev.bos)

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
            self.train_cfg,
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
    other than 0 of a multi-process run). A finished run's report is returned as it is."""
    out = Path(out_dir)
    validate(recipe, out, new_out=False)
    finished = out / "report.json"
    if finished.is_file() and (out / "recipe.yaml").read_text() == recipe.to_yaml():
        log.info("%s finished earlier; its report is kept", out)
        return json.loads(finished.read_text()) if _rank0() else None
    t_start = time.perf_counter()
    try:
        return _recover(recipe, out, progress, t_start)
    except BaseException:  # Ctrl-C, a kill by the scheduler, an error: count the time spent
        _record_invocation(out, {}, time.perf_counter() - t_start)
        raise


def _recover(recipe: Recipe, out_dir: Path, progress: bool, t_start: float) -> dict | None:
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
    with run.stage("load"):
        model, tok = load_model(recipe.model)
        check_finite_weights(model, recipe.model.name_or_path or "the embedded model")
    with run.stage("generate_data" if tr.data.startswith("generated:") else "load"):
        # train.data=generated:N: sampled from the FP model (a no-op for other sources)
        run.train_cfg = resolve_generated(tr, model, tok, progress, run.dist, run.device)
    with run.stage("load"):
        run.load_text(tok)
    with run.stage("eval_fp"):
        fp = run.cached("fp", lambda: {**run.ppl(model, "fp"), **bits_report(model)})
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
            quant = run.cached("quantized", lambda: run.ppl(model, "quantized"))
        final, train_report = _train_post(run, model, tok, teacher)
    else:
        quant = None
        final, train_report, quantized_report = _pre(run, model, tok, teacher)
    with run.stage("eval_recovered"):
        recovered = run.cached(
            "recovered", lambda: run.ppl(_load_final(run.out, final), "recovered")
        )
    d.close()
    if not d.main:
        return None
    ledger = _record_invocation(run.out, run.timings, time.perf_counter() - t_start)
    report = _report(
        recipe,
        run.out,
        final,
        fp,
        quant,
        recovered,
        quantized_report,
        _whole_run_train(run.out / "train", train_report),
        ledger,
        run.peak_gpu_mb,
    )
    _write_text(run.out / "report.md", report_table(report) + "\n")
    _write_text(run.out / "report.json", json.dumps(report, indent=2) + "\n")
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
        if tr.method == "gift":
            attach_gift(model, tr.noise, tr.noise_bits(recipe.quant.bits))
        else:
            from gift_quant.train.lora import attach_lora

            dora = tr.method == "dora"
            model, rank = attach_lora(model, tr.lora_rank, tr.lora_alpha, tr.seed, dora=dora)
            log.info(
                "%s rank %d (trainable parameters matched to the salient columns)", tr.method, rank
            )
    with run.stage("train"):
        rep = run.train(model, tok, teacher)
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
    with run.stage("train"):
        rep = run.train(model, tok, teacher)  # one process: pre mode refuses several
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


def apply_salient_checkpoint(model, checkpoint: Path) -> None:
    """Set every MixedLinear's salient columns from a training checkpoint (fp32 -> fp16)."""
    trained = load_file(checkpoint / "trainable.safetensors")
    for name, module in model.named_modules():
        key = f"{name}.salient_weight"
        if isinstance(module, MixedLinear) and key in trained:
            module.salient_weight = trained[key].to(torch.float16)


def _load_final(out: Path, final: Path):
    if final.name == "lora_adapter":
        from gift_quant.train.lora import load_lora

        return load_lora(load_quantized(out / "quantized"), final)
    return load_quantized(final)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def _rank0() -> bool:
    """Rank 0 of a multi-process launch (or the only process), before the group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def _record_invocation(out: Path, stage_seconds: dict, seconds: float) -> dict:
    """Add one invocation (and the stages it ran) to OUT/timings.json; return the ledger."""
    path = out / "timings.json"
    if not out.is_dir() or not _rank0():
        return {"invocations": [seconds], "stages": dict(stage_seconds)}
    ledger = json.loads(path.read_text()) if path.is_file() else {"invocations": [], "stages": {}}
    ledger["invocations"].append(seconds)
    for stage, t in stage_seconds.items():
        ledger["stages"][stage] = ledger["stages"].get(stage, 0.0) + t
    _write_text(path, json.dumps(ledger, indent=1) + "\n")
    return ledger


def _whole_run_train(train_dir: Path, rep: dict) -> dict:
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


def _report(recipe, out, final, fp, quant, recovered, qrep, trep, ledger, peak_gpu_mb) -> dict:
    q, tr = recipe.quant, recipe.train
    runs = ledger["invocations"]
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
