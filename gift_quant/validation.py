"""What ``recover`` and ``quantize`` refuse before their first expensive stage, before anything is
written to OUT: the device, the output directory (new, the same run, or a different recipe), the
model (from its config alone, on the meta device), every target Linear against the group size and
salient budget, the context lengths and the data sources. A run refused here leaves nothing
behind, so the corrected rerun just works.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml

from gift_quant.config import ModelConfig, TrainConfig
from gift_quant.data import check_sources
from gift_quant.files import check_new_out
from gift_quant.quantize import check_targets
from gift_quant.recipe import Recipe, RecipeError, recipe_from_dict

__all__ = [
    "STAGE_OUTPUTS",
    "check_device",
    "check_finite_weights",
    "check_space",
    "check_writable",
    "comparable",
    "finished_run",
    "meta_model",
    "planned_writes",
    "recipe_conflict",
    "validate",
]

STAGE_OUTPUTS = ("quantized", "train", "model", "lora_adapter")
# What a post-mode run's quantized start does not depend on: the training settings (the
# evaluation and export settings are also stored inside quantized/, which is itself the final
# model of LoRA and untrained runs, so they are not among them).
AFTER_QUANTIZED = {"train"}


def training_started(out: Path) -> bool:
    """Whether a run's training has left anything that depends on its settings: a checkpoint,
    or a final model or adapter (train/ alone is made before the first step)."""
    ckpts = out / "train" / "checkpoints"
    started = ckpts.is_dir() and any(ckpts.iterdir())
    return started or (out / "model").exists() or (out / "lora_adapter").exists()


def recipe_conflict(out: Path, recipe: Recipe) -> str | None:
    """Why ``out`` cannot hold this run (None when it can: new, same recipe, or no stage
    output yet -- a run refused or stopped before its first stage is simply restarted -- or
    only the training settings changed in post mode and the training has no checkpoint yet:
    a training that failed before its first checkpoint reruns on the same quantized start)."""
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a directory; give a directory path"
    path = out / "recipe.yaml"
    if not path.is_file():
        foreign = [p.name for p in out.iterdir() if not run_entry(p.name)] if out.is_dir() else []
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
    new = comparable(recipe)
    old = None if old is None else comparable(old)
    if old == new or not any((out / s).exists() for s in STAGE_OUTPUTS):
        return None
    diff = [s for s in new if old is None or old[s] != new[s]]
    if old is not None and set(diff) <= AFTER_QUANTIZED and old["train"]["mode"] == "post":
        if new["train"]["mode"] == "post" and not training_started(out):
            return None  # only the training changed, and it has nothing to resume
    return (
        f"{out} holds a run with a different recipe (sections {diff} differ); "
        f"use a new --out directory, or rerun with the recipe in {path}"
    )


def run_entry(name: str) -> bool:
    """Whether a file name belongs to a recover output directory."""
    known = ("recipe.yaml", "timings.json", "report.json", "report.md", *STAGE_OUTPUTS)
    hidden = name.startswith(".")  # the temporary siblings of interrupted writes
    return hidden or name in known or (name.startswith("eval_") and name.endswith(".json"))


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


def check_writable(out: Path) -> None:
    parent = _existing(out)
    if not os.access(parent, os.W_OK):
        raise RecipeError(f"--out {out}: {parent} is not writable; choose another --out")


def meta_model(cfg):
    """The model's skeleton on the meta device (no weights read) from its config alone;
    a missing path, a directory without config.json or an unreachable hub id is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gift_quant import assets
    from gift_quant.modeling import check_tokenizer_files

    name = cfg.name_or_path or str(assets.default_model_dir())
    path = Path(name).expanduser()
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    config_kwargs = {}
    local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if path.suffix == ".gguf" or cfg.gguf_file:
        gguf = path if path.suffix == ".gguf" else path / cfg.gguf_file
        if not gguf.is_file():
            raise RecipeError(f"model {str(gguf)!r}: no such GGUF file")
        source, config_kwargs["gguf_file"] = str(gguf.parent), gguf.name
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
        config = AutoConfig.from_pretrained(source, **kwargs, **config_kwargs)
    except (OSError, ValueError) as exc:
        if local:
            raise RecipeError(f"model {name!r}: unreadable config ({exc})") from exc
        raise RecipeError(
            f"model {name!r}: could not load it from the hub (offline, or no such model); "
            f"download it first and give its local directory"
        ) from exc
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is not None:
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else qcfg.quant_method
        raise RecipeError(
            f"model {name!r} is already quantized ({method}); quantize and recover take the "
            f"full-precision model (eval, inspect and export take a gift_quant export)"
        )
    if local and path.is_dir():
        check_tokenizer_files(path, name)
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
    if new_out:
        check_new_out(out)
    conflict = None if new_out else recipe_conflict(out, recipe)
    if conflict:
        raise RecipeError(conflict)
    check_writable(out)
    meta = meta_model(recipe.model)
    _, _, per_block, plan = check_targets(meta, recipe.model, recipe.saliency, recipe.quant)
    check_context(meta, recipe.calib.seq_len, "calib.seq_len")
    if not new_out:
        check_context(meta, recipe.eval.seq_len, "eval.seq_len")
    if not new_out and recipe.train.method != "none" and recipe.train.steps > 0:
        check_context(meta, recipe.train.seq_len, "train.seq_len")
    if not new_out:  # quantize checks only its calibration source itself
        check_sources(recipe)
    if new_out or not finished_run(out, recipe):
        writes = planned_writes(recipe, meta, per_block, plan, new_out=new_out)
        several = "train/checkpoints/" in writes and checkpoints_on_disk(recipe.train) > 1
        hint = " (train.save_every=0 keeps one checkpoint, the last)" if several else ""
        check_space(out, writes, hint)


def trainable_params(recipe: Recipe, meta, per_block, plan: dict[str, int]) -> int:
    """The parameters recover's training updates (what its checkpoints hold)."""
    from gift_quant.train.lora import adapter_params, matched_rank
    from gift_quant.train.norms import norm_modules

    tr = recipe.train
    layers = [
        (plan[n], lin.out_features, lin.in_features) for t in per_block for n, lin in t.items()
    ]
    if tr.method == "gift":
        norms = norm_modules(meta).values() if tr.norms else ()
        extra = sum(p.numel() for m in norms for p in m.parameters(recurse=False))
        return sum(k * n for k, n, _ in layers) + extra
    dora = tr.method == "dora"
    return adapter_params(layers, tr.lora_rank or matched_rank(layers, dora), dora)


def planned_writes(recipe: Recipe, meta, per_block, plan: dict[str, int], *, new_out: bool):
    """Tensor bytes a run writes into OUT, by what it writes them into: the export (quantize:
    "export"), or recover's quantized/, model/ or lora_adapter/ and its training
    checkpoints (as many as are on disk at once)."""
    from gift_quant.io.export import export_bytes
    from gift_quant.modeling import DTYPES
    from gift_quant.train.checkpoint import checkpoint_bytes

    export = export_bytes(meta, plan, recipe.quant, DTYPES[recipe.model.dtype])
    if new_out:
        return {"export": export}
    tr = recipe.train
    writes = {} if tr.mode == "pre" else {"quantized/": export}
    if tr.method == "none" or tr.steps == 0:
        return writes
    trainable = trainable_params(recipe, meta, per_block, plan)
    if tr.method == "gift":
        writes["model/"] = export
    else:
        writes["lora_adapter/"] = trainable * 4  # PEFT saves its fp32 weights
    writes["train/checkpoints/"] = checkpoints_on_disk(tr) * checkpoint_bytes(trainable)
    return writes


def checkpoints_on_disk(tr: TrainConfig) -> int:
    """How many training checkpoints are on disk at once, at most."""
    from gift_quant.train.checkpoint import KEEP

    saves = {s for s in range(1, tr.steps + 1) if tr.save_every and s % tr.save_every == 0}
    return min(len(saves | {tr.steps}), KEEP + 1)


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError  # unreachable


# where each of planned_writes' outputs goes, under OUT
DESTINATIONS = {
    "export": ".",
    "quantized/": "quantized",
    "model/": "model",
    "lora_adapter/": "lora_adapter",
    "train/checkpoints/": "train/checkpoints",
}


def _existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (where it would be made)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _reclaimable(out: Path) -> dict[int, int]:
    """Bytes of a killed run's partial writes under OUT (and beside it), by file system: the
    next write of the same target removes them before it starts."""
    from gift_quant.io.export import stale_partials

    beside = out.absolute().parent
    stale = stale_partials(beside, out.name) if beside.is_dir() else []
    for parent in (out, out / "train" / "checkpoints"):
        stale += stale_partials(parent) if parent.is_dir() else []
    reclaim: dict[int, int] = {}
    for path in stale:
        dev = path.stat().st_dev
        reclaim[dev] = reclaim.get(dev, 0) + _bytes_under(path)
    return reclaim


def check_space(out: Path, writes: dict[str, int], hint: str = "") -> None:
    """Refuse a run whose outputs cannot fit: what ``writes`` (:func:`planned_writes`) holds,
    less what an earlier invocation already finished, against the free space (and a killed
    run's partial writes) of each output's file system. ``hint``: how the checkpoints could
    take less."""
    done = {
        "quantized/": (out / "quantized" / "config.json").is_file(),
        "model/": (out / "model" / "config.json").is_file(),
        "lora_adapter/": (out / "lora_adapter" / "adapter_config.json").is_file(),
    }
    final_done = done["model/"] or done["lora_adapter/"]
    by_fs: dict[int, tuple[Path, dict[str, int]]] = {}
    for where, nbytes in writes.items():
        if where == "train/checkpoints/":
            ckpts = out / "train" / "checkpoints"
            there = _bytes_under(ckpts) if ckpts.is_dir() else 0
            nbytes = 0 if final_done else max(0, nbytes - there)
        elif done.get(where):
            nbytes = 0
        if nbytes:
            root = _existing(out / DESTINATIONS[where])
            by_fs.setdefault(root.stat().st_dev, (root, {}))[1][where] = nbytes
    reclaim = _reclaimable(out) if by_fs else {}
    for dev, (root, need) in by_fs.items():
        free = shutil.disk_usage(root).free + reclaim.get(dev, 0)
        total = sum(need.values())
        if total > free:
            parts = ", ".join(f"{w} {_size(b)}" for w, b in need.items())
            tail = hint if "train/checkpoints/" in need else ""
            raise RecipeError(
                f"--out {out}: this command writes at least {_size(total)} ({parts}) on the "
                f"file system of {root}, which has {_size(free)} free; free some space or "
                f"choose an --out on a larger disk{tail}"
            )


def finished_run(out: Path, recipe: Recipe) -> bool:
    """Whether ``out`` holds this recipe's finished run (whose rerun only returns its report)."""
    recipe_file = out / "recipe.yaml"
    return (
        (out / "report.json").is_file()
        and recipe_file.is_file()
        and recipe_file.read_text() == recipe.to_yaml()
    )


def comparable(recipe: Recipe) -> dict:
    """The recipe as a dict without the keys that cannot change a result (timeouts, logging),
    so a rerun may change them and still resume."""
    return without_runtime_keys(recipe.to_dict())


def without_runtime_keys(d: dict) -> dict:
    """A recipe dict (as saved in recipe.yaml) without its runtime keys (see comparable)."""
    d = {section: dict(values or {}) for section, values in d.items()}
    for section, keys in (("model", ModelConfig.RUNTIME_KEYS), ("train", TrainConfig.RUNTIME_KEYS)):
        for key in keys:
            d.get(section, {}).pop(key, None)
    return d
