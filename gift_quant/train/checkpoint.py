"""Training checkpoints as safetensors + JSON (never pickle), written atomically.

A checkpoint ``step-000050/`` holds ``trainable.safetensors`` (the trainable parameters by
name), ``optimizer.safetensors`` (their optimizer state, keyed ``<param>::<state>``),
``rng.safetensors`` (torch's CPU RNG state) and ``state.json`` (step, scheduler state, optimizer
hyper-parameters, a fingerprint of the recipe). The data position and the noise seeds are
functions of the step, so these files are all a resume needs to continue bit-identically.

Tensors go through torch.distributed.checkpoint's full (unsharded) state dicts, so the same
files serve one process, DDP and FSDP, and a run saved by N processes resumes on M. Every rank
calls :func:`save_checkpoint` (gathering sharded tensors is collective); only rank 0 writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from gift_quant.io.export import atomic_directory

__all__ = ["KEEP", "checkpoint_bytes", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

_FULL = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
KEEP = 2  # checkpoints kept; a third is whole on disk before the oldest goes


def checkpoint_bytes(trainable: int) -> int:
    """Tensor bytes of one checkpoint of ``trainable`` parameters: fp32 master weights and
    AdamW's two fp32 moments of each (the RNG state adds a few kilobytes)."""
    return trainable * 4 * 3


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous()


def save_checkpoint(
    root: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    fingerprint: dict,
    keep: int = KEEP,
    write: bool = True,
) -> Path:
    names = set(_trainable_names(model))
    params = {
        k: _cpu(v) for k, v in get_model_state_dict(model, options=_FULL).items() if k in names
    }
    osd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    target = root / f"step-{step:06d}"
    if not write:
        return target
    opt_tensors, opt_scalars = {}, {}
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                opt_tensors[f"{fqn}::{key}"] = _cpu(value)
            else:
                opt_scalars[f"{fqn}::{key}"] = float(value)
    state = {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "param_groups": osd["param_groups"],
        "optimizer_scalars": opt_scalars,
        "param_names": sorted(params),
        "fingerprint": fingerprint,
    }
    root.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target) as tmp:
        save_file(params, tmp / "trainable.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file({"cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in sorted(root.glob("step-*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(
    path: Path, model, optimizer, scheduler, fingerprint: dict, upgrade=None
) -> int:
    """Restore everything saved by :func:`save_checkpoint`; return the step reached.
    ``upgrade(stored)`` brings a fingerprint written by an older version to today's form."""
    state = json.loads((path / "state.json").read_text())
    stored = upgrade(state["fingerprint"]) if upgrade else state["fingerprint"]
    fingerprint = upgrade(fingerprint) if upgrade else fingerprint  # both in one form
    if stored != fingerprint:
        diff = sorted(
            k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k)
        )
        raise ValueError(
            f"{path} was written with a different recipe ({', '.join(diff)} differ); "
            f"resume with the same recipe or use a new --out directory"
        )
    if sorted(_trainable_names(model)) != state["param_names"]:
        raise ValueError(f"{path}: trainable parameters differ from the checkpoint's")
    params = load_file(path / "trainable.safetensors")
    set_model_state_dict(
        model, params, options=StateDictOptions(full_state_dict=True, strict=False)
    )
    per_param: dict[str, dict] = {}
    for key, value in load_file(path / "optimizer.safetensors").items():
        fqn, name = key.split("::", 1)
        per_param.setdefault(fqn, {})[name] = value
    for key, value in state["optimizer_scalars"].items():
        fqn, name = key.split("::", 1)
        per_param.setdefault(fqn, {})[name] = torch.tensor(value)
    osd = {"state": per_param, "param_groups": state["param_groups"]}
    set_optimizer_state_dict(model, optimizer, osd, options=_FULL)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(path / "rng.safetensors")["cpu"])
    return int(state["step"])
