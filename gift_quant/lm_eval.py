"""Zero-shot accuracy through lm-eval's HF wrapper on any loaded model (the ``[eval]`` extra).

Local tasks (shipped in ``gift_quant/tasks``) run offline; any other name is looked up in
lm-eval's task registry and downloads its data set, so it needs a network.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from importlib.resources import files

import yaml
from torch import nn

from gift_quant.config import RecipeError

__all__ = ["LOCAL_TASKS", "check_tasks", "run_tasks"]

LOCAL_TASKS = ("wiki_cloze",)
STANDARD_TASKS = ("hellaswag", "arc_easy", "piqa", "winogrande")


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise RecipeError(
            "--tasks needs lm-eval, which is not installed; pip install 'gift_quant[eval]'"
        )


def _local_config(name: str) -> dict:
    root = files("gift_quant.tasks")
    config = yaml.safe_load((root / f"{name}.yaml").read_text())
    config["dataset_kwargs"] = {"data_files": {"train": str(root / f"{name}.jsonl")}}
    return config


def _offline() -> bool:
    return any(
        os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def check_tasks(tasks: list[str]) -> list[str | dict]:
    """lm-eval task specs for ``tasks``; a one-line RecipeError for an unknown name or a
    missing lm-eval, before any model is loaded. Offline (HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE set) only the local tasks exist: the others download their data."""
    _require_lm_eval()
    if not tasks or any(not t for t in tasks):
        raise RecipeError("--tasks: give comma-separated task names, e.g. --tasks wiki_cloze")
    others = [t for t in tasks if t not in LOCAL_TASKS]
    if others and not _offline():
        from lm_eval.tasks import TaskManager  # indexes every task YAML: only when needed

        registry = set(TaskManager().all_tasks)
        others = [t for t in others if t not in registry]
    if others:
        where = "offline (HF_HUB_OFFLINE is set)" if _offline() else "in lm-eval's registry"
        raise RecipeError(
            f"unknown lm-eval task(s) {', '.join(others)} {where}; local tasks: "
            f"{', '.join(LOCAL_TASKS)}; with a network any lm-eval task, e.g. "
            f"{', '.join(STANDARD_TASKS)}"
        )
    return [_local_config(t) if t in LOCAL_TASKS else t for t in tasks]


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    batch_size: int = 8,
    limit=None,
    progress: bool = True,
) -> dict:
    """``{task: {metric: value}}`` of lm-eval's zero-shot evaluation of ``model``; with
    ``progress=False`` lm-eval's scoring bars are off (the CLI's ``-q``)."""
    specs = check_tasks(tasks)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(
                requests, disable_tqdm=disable_tqdm or not progress
            )

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    # it warns that an initialized model was passed in, which is how this wrapper is used
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    device = str(next(model.parameters()).device)
    lm = _HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = None
    if all(isinstance(s, dict) for s in specs):  # local tasks only: skip indexing lm-eval's
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=specs, limit=limit, log_samples=False, task_manager=manager
    )
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {
            k.split(",")[0]: v
            for k, v in metrics.items()
            if isinstance(v, int | float) and not k.startswith("alias")
        }
    return results
