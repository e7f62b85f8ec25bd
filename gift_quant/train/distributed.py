"""Multi-process training on torch.distributed, launched by ``torchrun`` or ``accelerate launch``.

The launcher sets RANK / WORLD_SIZE / LOCAL_RANK; nothing here starts processes. Two ways to
spread the existing training loop over ranks, picked by ``train.parallel``:

- ``ddp``: every rank holds the whole (packed) model; DistributedDataParallel all-reduces the
  gradients of the trainable parameters (salient columns or LoRA) once per optimizer step;
- ``fsdp``: torch's FSDP2 (``fully_shard`` per decoder block, then the root) shards the
  trainable parameters and their optimizer state; the frozen packed base (buffers) stays
  replicated, which is what FSDP does with buffers.

Each rank takes its slice of every global micro-batch, so N ranks see exactly the batches one
process sees. Only rank 0 writes checkpoints, metrics, exports and reports, and shows progress.
Checkpoints hold full (unsharded) tensors, so a run saved by N ranks resumes on M ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CollectiveTimeout", "Dist", "init", "rank0", "shard_rows"]


class CollectiveTimeout(RuntimeError):
    """A collective did not complete in time: some rank failed or is stuck."""


@dataclass
class Dist:
    """This process's place in the run. ``stage`` names what the run is doing, so a collective
    that times out says where; ``timeout`` bounds every collective (seconds)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout: float = 1800.0
    stage: str = "start"
    cpu_group: object = field(default=None, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        """Wait for every rank; on a CPU (gloo) group, so a rank that waits for rank 0's long
        stage (quantize, export) holds no GPU collective open. Bounded by ``timeout``."""
        if not self.enabled:
            return
        try:
            dist.monitored_barrier(
                group=self.cpu_group,
                timeout=datetime.timedelta(seconds=self.timeout),
                wait_all_ranks=True,
            )
        except RuntimeError as exc:
            raise CollectiveTimeout(
                f"rank {self.rank}/{self.world}: stage {self.stage!r}: the other processes did "
                f"not reach the barrier within train.dist_timeout_s={self.timeout:.0f}s "
                f"({str(exc).splitlines()[0]}); a rank failed or is stuck: see its log"
            ) from exc

    def close(self) -> None:
        """Leave the process group (every rank, at the end of a run)."""
        if self.enabled and dist.is_initialized():
            self.stage = "close"
            self.barrier()
            dist.destroy_process_group()

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        work = dist.all_reduce(t, group=self.cpu_group, async_op=True)
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise CollectiveTimeout(
                f"rank {self.rank}/{self.world}: stage {self.stage!r}: an all-reduce did not "
                f"complete within train.dist_timeout_s={self.timeout:.0f}s; a rank failed or "
                f"is stuck: see its log"
            ) from exc
        return float(t)


def init(device: torch.device, timeout_s: float = 1800.0) -> Dist:
    """The process group of this run (a single process when no launcher set WORLD_SIZE).

    On GPUs: NCCL bound to this rank's device (``device_id``, set before the group exists, so
    NCCL never guesses it from the rank), with a CPU (gloo) group beside it for barriers and
    scalar sums. Every collective is bounded by ``timeout_s``: a stuck rank becomes an error
    that names the rank and the stage instead of a hang.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = datetime.timedelta(seconds=timeout_s)
    cuda = device.type == "cuda"
    if cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are "
                f"visible; launch at most that many processes per node"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        kwargs = {"device_id": torch.device("cuda", local)} if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, **kwargs)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if cuda else None
    return Dist(dist.get_rank(), dist.get_world_size(), local, timeout_s, cpu_group=cpu_group)


def rank_device(d: Dist, device: torch.device) -> torch.device:
    return torch.device("cuda", d.local_rank) if device.type == "cuda" and d.enabled else device


def shard_rows(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's rows of a global micro-batch (rows rank, rank + world, ...)."""
    if not d.enabled:
        return x
    if x.shape[0] % d.world:
        raise ValueError(
            f"train.batch_size={x.shape[0]} must be a multiple of the {d.world} processes"
        )
    return x[d.rank :: d.world]


def wrap(model: nn.Module, d: Dist, strategy: str, device: torch.device) -> nn.Module:
    """The model as the training loop runs it on this rank (itself when single-process)."""
    if not d.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model,
            device_ids=[d.local_rank] if device.type == "cuda" else None,
            broadcast_buffers=False,  # the frozen packed base never changes
        )
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from gift_quant.modeling import decoder_blocks

        for block in decoder_blocks(model)[1]:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"train.parallel must be ddp or fsdp, got {strategy!r}")


def no_sync(model: nn.Module, last_micro_step: bool):
    """Skip DDP's all-reduce on all but the last micro-step of an optimizer step."""
    if last_micro_step or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def rank0() -> bool:
    """Rank 0 of a multi-process launch (or the only process), before the group exists."""
    return int(os.environ.get("RANK", "0")) == 0
