"""The recovery training loop: AdamW + cosine warm-up, gradient accumulation, optional
distillation, periodic held-out evaluation, exact resume from checkpoints, JSON-lines metrics.

It trains whatever parameters of the model require grad -- the GIFT-SW salient columns or a
LoRA adapter -- and knows nothing else about them, except that GiftLinear layers take a noise
seed before every forward pass. Seeds and batches are functions of (seed, step, micro-step), so
a resumed run repeats the uninterrupted one bit for bit on the CPU.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gift_quant.modeling import check_context, resolve_dtype
from gift_quant.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gift_quant.train.cross_entropy import causal_ce_sum
from gift_quant.train.data import IGNORE, TrainBatch, build_train_data
from gift_quant.train.distributed import Dist, no_sync, shard_rows, wrap
from gift_quant.train.gift_linear import GiftLinear

try:  # FSDP2-sharded modules answer isinstance(FSDPModule); evaluation runs after gathering
    from torch.distributed.fsdp import FSDPModule as Sharded
except ImportError:  # pragma: no cover
    Sharded = ()

log = logging.getLogger(__name__)

__all__ = ["TrainReport", "train"]


@dataclass
class TrainReport:
    steps: int = 0
    resumed_from: int = 0
    tokens: int = 0
    trainable_params: int = 0
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    tokens_per_second: float = 0.0
    tokens_per_second_steady: float = 0.0  # after the first step (warm-up, compilation)
    seconds_first_step: float | None = None  # this session's first step (compilation, warm-up)
    seconds_per_step_steady: float | None = None  # the later steps of this session
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float = 0.0  # this rank's peak allocated CUDA memory (0 on the CPU)
    final_loss: float = float("nan")
    evals: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def noise_seed(seed: int, step: int, micro: int, layer: int) -> int:
    """A distinct, reproducible seed per (run seed, step, micro-step, layer)."""
    return (((seed * 1_000_003 + step) * 1_009 + micro) * 100_003 + layer) % (2**62)


# On the CPU each rebuild of the GiftLinear training weights costs a SmolLM2 step 0.25 s (the C
# kernel, cpu_noise.c) to 0.6 s (the torch twin, whose generator is serial). The backward pass
# may reuse the forward pass's weight instead (the same seed gives the same weight, so the result
# is the same), holding every layer's W^T between the two passes: done where the ranks' copies
# together take at most this share of the memory available when training starts, and never with
# activation checkpointing (whose point is not holding per-layer tensors between the passes).
KEEP_WEIGHTS_SHARE = 0.25


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _available_bytes() -> int | None:
    """Memory available to a new allocation: Linux's MemAvailable, capped by this process's
    cgroup (v2) limit less its use; None if unknown."""
    meminfo = _read("/proc/meminfo") or ""
    kb = [ln.split()[1] for ln in meminfo.splitlines() if ln.startswith("MemAvailable:")]
    if not kb or not kb[0].isdigit():
        return None
    available = int(kb[0]) * 1024
    limit, used = _read("/sys/fs/cgroup/memory.max"), _read("/sys/fs/cgroup/memory.current")
    if limit and used and limit.strip().isdigit() and used.strip().isdigit():
        available = min(available, int(limit) - int(used))
    return available


def _keep_weights(gift: list, model: nn.Module, device, dtype, ranks: int) -> bool:
    """Whether the GiftLinear layers keep their training weight for the backward pass (``ranks``
    processes, taken to share this host's memory). Asked once activation checkpointing is
    set up: a transformers model checkpoints where its modules' `gradient_checkpointing` is
    set, by the recipe's ``grad_checkpointing`` or by the caller."""
    checkpointed = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if device.type != "cpu" or checkpointed or not gift:
        return False
    held = sum(m.in_features * m.out_features for m in gift) * dtype.itemsize * ranks
    available = _available_bytes()
    keep = available is not None and held <= KEEP_WEIGHTS_SHARE * available
    log.info(
        "GIFT-SW training weights %s for the backward pass (%.0f MiB, %s MiB available)",
        "kept" if keep else "rebuilt",
        held / 2**20,
        "?" if available is None else f"{available / 2**20:.0f}",
    )
    return keep


def _frozen_to(model: nn.Module, dtype: torch.dtype) -> list:
    """Cast frozen parameters (biases of the quantized layers included) to the compute dtype;
    trainable ones stay fp32. Returns what :func:`_restore` needs to put the original tensors
    back untouched."""
    saved = []
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            saved.append((p, "data", p.data))
            p.data = p.data.to(dtype)
    return saved


def _restore(saved: list) -> None:
    for owner, attr, original in saved:
        device = getattr(owner, attr).device
        setattr(owner, attr, original.to(device))


def _loss_sums(logits: torch.Tensor, batch: TrainBatch, teacher_logits, kd_weight: float, T: float):
    """(loss, ce) summed over the label tokens of ``batch`` -- CE, mixed with T^2 KL(teacher ||
    student) if asked. Sums, not means: the caller divides by the label tokens of the whole
    optimizer step, so every label token weighs the same however the micro-batches and ranks
    split them (chat data labels only the assistant tokens, so rows differ)."""
    ce = causal_ce_sum(logits, batch.labels, IGNORE)
    if teacher_logits is None or kd_weight == 0:
        return ce, ce
    mask = batch.labels[:, 1:] != IGNORE
    t = teacher_logits[:, :-1].float()[mask] / T
    s = logits[:, :-1].float()[mask] / T
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    return (1 - kd_weight) * ce + kd_weight * kl * T * T, ce


def train(
    model: nn.Module,
    tokenizer,
    cfg,
    out_dir: str | Path,
    *,
    fingerprint: dict,
    fingerprint_upgrade=None,
    teacher: nn.Module | None = None,
    eval_fn=None,
    progress: bool = True,
    device: torch.device | str = "cpu",
    dist: Dist | None = None,
    on_step=None,
) -> TrainReport:
    """Train the parameters of ``model`` that require grad, per a TrainConfig ``cfg``.

    Frozen tensors run in the compute dtype during training and get their original values
    (and dtype) back at the end, so nothing but the trained parameters changes.

    ``out_dir`` receives ``checkpoints/`` and ``metrics.jsonl``; an existing checkpoint whose
    fingerprint matches (after ``fingerprint_upgrade(stored)``, where given) is resumed.
    ``eval_fn(model) -> dict`` runs every ``cfg.eval_every`` steps and at the end;
    ``on_step()`` after every optimizer step (a profiler's step, say). ``teacher`` (frozen,
    eval mode) enables distillation. Under a multi-process launcher (``dist``), each rank
    trains on its rows of every global micro-batch through DDP or FSDP (``cfg.parallel``);
    rank 0 alone logs and writes.
    """
    from transformers import get_cosine_schedule_with_warmup

    d = dist or Dist()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    report = TrainReport(trainable_params=sum(p.numel() for p in params))
    originals = _frozen_to(model, dtype)
    model.to(device)
    gift = [m for m in model.modules() if isinstance(m, GiftLinear)]
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    keep = _keep_weights(gift, model, device, dtype, d.world)
    for m in gift:
        m.keep_weight = keep

    runner = wrap(model, d, cfg.parallel, device)  # the model itself when single-process
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP replaces them
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * cfg.steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, max(cfg.steps, 1))
    check_context(model, cfg.seq_len, "train.seq_len")
    data = build_train_data(
        cfg.data,
        tokenizer,
        cfg.seq_len,
        cfg.seed,
        bos=cfg.bos,
        max_examples=cfg.steps * cfg.batch_size * cfg.grad_accum,
    )
    ckpt_root = out / "checkpoints"
    start = 0
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        start = load_checkpoint(
            latest, model, optimizer, scheduler, fingerprint, upgrade=fingerprint_upgrade
        )
        log.info("resuming from %s (step %d of %d)", latest, start, cfg.steps)
    report.resumed_from = start
    metrics = (out / "metrics.jsonl").open("a") if d.main else None
    d.stage = "train"
    d.barrier()  # every rank is set up: a rank stuck in set-up is named here, not in a step

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not progress
    )
    loss_val = float("nan")
    for step in bar:
        t_step = time.perf_counter()
        fulls = [
            data.batch(step * cfg.grad_accum + m, cfg.batch_size) for m in range(cfg.grad_accum)
        ]
        # Every rank reads the whole global batch, so each knows the step's label-token count
        # without communicating. DDP and FSDP average gradients over ranks, hence the `world`.
        tokens = sum(f.num_label_tokens for f in fulls)
        scale = d.world / max(tokens, 1)
        loss_sum = ce_sum = 0.0
        for micro, full in enumerate(fulls):
            batch = TrainBatch(
                *(
                    shard_rows(t, d).to(device)
                    for t in (full.input_ids, full.labels, full.attention_mask)
                )
            )
            for i, m in enumerate(gift):
                m.noise_seed = noise_seed(cfg.seed, step, micro, i)
            teacher_logits = None
            if teacher is not None and cfg.kd_weight > 0:
                with torch.no_grad():
                    teacher_logits = teacher(
                        input_ids=batch.input_ids, attention_mask=batch.attention_mask
                    ).logits
            with no_sync(runner, micro == cfg.grad_accum - 1):
                logits = runner(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits
                loss, ce = _loss_sums(
                    logits, batch, teacher_logits, cfg.kd_weight, cfg.kd_temperature
                )
                (loss * scale).backward()
            loss_sum += float(loss.detach())
            ce_sum += float(ce.detach())
        # reported the way it is optimised: the mean over the step's label tokens, all ranks
        loss_sum, ce_sum = d.sum(loss_sum) / max(tokens, 1), d.sum(ce_sum) / max(tokens, 1)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t_step
        if on_step is not None:
            on_step()
        report.tokens += tokens
        if step == start:
            t_steady, tokens_first = time.perf_counter(), report.tokens
            report.seconds_first_step = dt
        loss_val = loss_sum
        row = {
            "step": step + 1,
            "loss": loss_sum,
            "ce": ce_sum,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens": tokens,
            "seconds": dt,
            "tokens_per_s": tokens / dt,
        }
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{tokens / dt:.0f}")
        done = step + 1 == cfg.steps
        evaluate = (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done
        if eval_fn is not None and evaluate and d.main and not isinstance(runner, Sharded):
            model.eval()
            row["eval"] = eval_fn(model)
            report.evals.append({"step": step + 1, **row["eval"]})
            model.train()
        if d.main and cfg.log_every and ((step + 1) % cfg.log_every == 0 or done or "eval" in row):
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or done:
            save_checkpoint(
                ckpt_root, step + 1, model, optimizer, scheduler, fingerprint, write=d.main
            )
            d.barrier()
    if metrics is not None:
        metrics.close()
    model.eval()
    for m in gift:
        m.keep_weight = False
    _restore(originals)
    ran = cfg.steps - start
    report.steps = cfg.steps
    report.seconds = time.perf_counter() - t0
    report.seconds_per_step = report.seconds / ran if ran else 0.0
    report.tokens_per_second = report.tokens / report.seconds if ran else 0.0
    if ran > 1:
        steady = time.perf_counter() - t_steady
        report.tokens_per_second_steady = (report.tokens - tokens_first) / steady
        report.seconds_per_step_steady = steady / (ran - 1)
    if device.type == "cuda":
        report.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report.final_loss = loss_val
    return report
