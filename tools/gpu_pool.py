"""Where the sweep's next row runs: at most ``jobs`` rows at once, spread over ``gpus`` GPUs by
the memory each row is expected to need (tools/sweep_recovery.py)."""

from __future__ import annotations

import subprocess
import threading


def gpu_memory_mb() -> float:
    """The smallest GPU's memory in MiB from nvidia-smi, or 0 where there is none to ask (then
    rows are placed by count only). Asked without torch, so the sweep's own process makes no
    CUDA context."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return min(float(x) for x in out.split())
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0.0


class GpuPool:
    """Up to ``jobs`` leases at once. A lease goes to the GPU with the least expected memory in
    use among those where ``need_mb`` still fits under ``capacity_mb`` (a GPU running nothing
    always fits); a row waits while none has room. ``capacity_mb`` 0: by count only. Without
    GPUs (``gpus`` 0) the lease is None."""

    def __init__(self, jobs: int, gpus: int, capacity_mb: float = 0.0) -> None:
        self.jobs, self.gpus, self.capacity = max(1, jobs), gpus, capacity_mb
        self.cond = threading.Condition()
        self.running = 0
        self.used = [0.0] * max(1, gpus)  # expected MiB of the rows on each GPU
        self.count = [0] * max(1, gpus)

    def _room(self, gpu: int, need_mb: float) -> bool:
        free = not self.count[gpu]
        return free or not self.capacity or self.used[gpu] + need_mb <= self.capacity

    def acquire(self, need_mb: float) -> int | None:
        with self.cond:
            while True:
                fits = [g for g in range(len(self.used)) if self._room(g, need_mb)]
                if self.running < self.jobs and fits:
                    gpu = min(fits, key=lambda g: (self.used[g], self.count[g], g))
                    self.running += 1
                    self.used[gpu] += need_mb
                    self.count[gpu] += 1
                    return gpu if self.gpus else None
                self.cond.wait()

    def release(self, gpu: int | None, need_mb: float) -> None:
        with self.cond:
            g = gpu or 0
            self.running -= 1
            self.used[g] -= need_mb
            self.count[g] -= 1
            self.cond.notify_all()
