"""First-use measurement of the kernel that serves a layer shape (pure torch; ``ops.tuned_route``
supplies the candidates and how to launch them).

A measurement is kept per (device, N, K, bits, group, salient count, M bucket) for the
process: the same call always takes the same kernel afterwards. Each candidate is launched
once (Triton compiles there), then TUNE_REPS times, interleaved, each after the L2 cache is
overwritten (the weights come from memory, as in a model whose other layers ran in between);
the median of CUDA-event times counts. Between the flush and the start event the GPU is held
busy for HOLD_CYCLES, so that the host has queued the launch before the start event is
reached; without the hold the events also time the host's launch path whenever it outlasts the
flush, as a Triton launch (Python) can. At 112077f, 17 of 24 first-use readings of Triton
kernels on 4096^2 and 5120^2 were 77-189 us, for kernels that replayed in 11-22 us in a CUDA
graph at M = 16-32, and the CUDA kernel was kept where Triton was faster
(benchmarks/results/kernels_h200.json, ``tuning``; docs/KERNELS-NOTES.md, T3).
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

TUNE_REPS = 5
HOLD_CYCLES = 1_000_000  # GPU clock cycles (0.5 ms at 2 GHz): longer than a launch's host path

_kept: dict[tuple, str] = {}  # key -> kernel
_timings: dict[tuple, dict[str, float]] = {}  # key -> {kernel: seconds} as measured
_FIELDS = ("device", "N", "K", "bits", "group", "salient", "m_bucket")


def m_bucket(M: int) -> int:
    """The M a measurement is kept for: calls with M rows share the kernel of M_bucket rows
    (the CUDA kernel stages 16 rows for M <= 16, 32 for M <= 32)."""
    return 4 if M <= 4 else 8 if M <= 8 else 16 if M <= 16 else 32


def key(device, N: int, K: int, bits: int, group: int, nsal: int, M: int) -> tuple:
    return (device, N, K, bits, group, nsal, m_bucket(M))


def kept(k: tuple) -> str | None:
    """The kernel measured (or fixed) for ``k``, if any."""
    return _kept.get(k)


def choose(
    k: tuple,
    names: list[str],
    launch: Callable[[str], None],
    rule: str,
    device: torch.device,
    timer=None,
) -> str:
    """The fastest of ``names`` for ``k``, measured now and kept; ``rule`` where nothing can be
    measured (``GIFT_QUANT_TUNE=0``, a call inside CUDA-graph capture, no GPU memory to spare,
    no candidate that launches), and kept too. ``timer`` (names, launch) -> {name: seconds}
    replaces the CUDA-event timing (tests)."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    times: dict[str, float] = {}
    if not capturing and os.environ.get("GIFT_QUANT_TUNE", "1") != "0":
        try:
            if timer is not None:
                times = timer(names, launch)
            else:
                with torch.cuda.device(device):  # events, flush and launches on the layer's GPU
                    times = _time(names, launch)
        except torch.OutOfMemoryError:  # no room to measure: the rule, as without tuning
            log.warning("no GPU memory to time the kernels of %s; the rule serves it", k)
        _timings[k] = times
    _kept[k] = min(times, key=times.get) if times else rule
    return _kept[k]


def record() -> list[dict]:
    """Every measurement made so far: the key, the kernel kept and each candidate's seconds
    (the tools write it into their JSON)."""
    return [
        {**dict(zip(_FIELDS, k, strict=True)), "kept": _kept[k], "seconds": times}
        for k, times in _timings.items()
    ]


def _time(names: list[str], launch: Callable[[str], None]) -> dict[str, float]:
    """Median seconds of each kernel that launches (see the module docstring)."""
    ok = []
    for name in names:
        try:
            launch(name)  # compiles a Triton kernel the first time
            ok.append(name)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as exc:
            log.warning("kernel %s left out of tuning: %s", name, exc)
    device = torch.cuda.current_device()
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    flush = torch.empty(max(2 * l2, 1 << 20) // 4, dtype=torch.int32, device=device)
    events: dict[str, list] = {n: [] for n in ok}
    for _ in range(TUNE_REPS):
        for name in ok:
            flush.zero_()
            torch.cuda._sleep(HOLD_CYCLES)  # the host queues the launch meanwhile
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            launch(name)
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {
        n: statistics.median(a.elapsed_time(b) for a, b in ev) / 1e3 for n, ev in events.items()
    }
