"""Training checkpoints as safetensors + JSON (never pickle), written atomically.

A checkpoint ``step-000050/`` holds ``trainable.safetensors`` (the trainable parameters by
name), ``optimizer.safetensors`` (per-parameter optimizer state), ``rng.safetensors`` (torch's
CPU RNG state) and ``state.json`` (step, scheduler state, optimizer hyper-parameters, a
fingerprint of the recipe). The data position and the noise seeds are functions of the step,
so these files are all a resume needs to continue bit-identically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .export import atomic_directory

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    root: Path, step: int, model, optimizer, scheduler, fingerprint: dict, keep: int = 2
) -> Path:
    params = _trainable(model)
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    opt_tensors, opt_scalars = {}, {}
    for p, state in optimizer.state.items():
        i = index[id(p)]
        for key, value in state.items():
            if torch.is_tensor(value):
                opt_tensors[f"{i}.{key}"] = value.detach().cpu().contiguous()
            else:
                opt_scalars[f"{i}.{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "param_groups": groups,
        "optimizer_scalars": opt_scalars,
        "param_names": list(params),
        "fingerprint": fingerprint,
    }
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:06d}"
    with atomic_directory(target) as tmp:
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in params.items()},
            tmp / "trainable.safetensors",
        )
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file({"cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_jsonable))
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _jsonable(value):
    if torch.is_tensor(value):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in sorted(root.glob("step-*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, scheduler, fingerprint: dict) -> int:
    """Restore everything saved by :func:`save_checkpoint`; return the step reached."""
    state = json.loads((path / "state.json").read_text())
    if state["fingerprint"] != fingerprint:
        diff = sorted(
            k
            for k in set(state["fingerprint"]) | set(fingerprint)
            if state["fingerprint"].get(k) != fingerprint.get(k)
        )
        raise ValueError(
            f"{path} was written with a different recipe ({', '.join(diff)} differ); "
            f"resume with the same recipe or use a new --out directory"
        )
    params = _trainable(model)
    if list(params) != state["param_names"]:
        raise ValueError(f"{path}: trainable parameters differ from the checkpoint's")
    saved = load_file(path / "trainable.safetensors")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    tensors = load_file(path / "optimizer.safetensors")
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = value.to(flat[int(i)].device)
    for key, value in state["optimizer_scalars"].items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = value
    ids, start = [], 0
    for g in optimizer.param_groups:  # load_state_dict names parameters by position
        ids.append(list(range(start, start + len(g["params"]))))
        start += len(g["params"])
    groups = [{**saved, "params": i} for saved, i in zip(state["param_groups"], ids, strict=True)]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(path / "rng.safetensors")["cpu"])
    return int(state["step"])
