"""First-use measurement of the kernel that serves a layer shape (pure torch;
``dispatch.tuned_route`` supplies the candidates and how to launch them).

A measurement is kept per (device, N, K, bits, group, salient count, M bucket, activation
dtype) for the process:
the same call always takes the same kernel afterwards. Each candidate is launched once (Triton
compiles there), then captured in a CUDA graph of at least GRAPH_CALLS launches back to back,
cycling over copies of the layer's weights (at most MAX_COPIES) whose layout a candidate reads
passes twice the L2 cache (the weights come from memory, as in a model whose other layers ran in
between, and a graph starts on copies the previous one left cold); the graphs are replayed
TUNE_REPS times, interleaved, and the median per launch counts. This is how a decode step runs
the kernels (graphs, one kernel's start overlapping the previous one's end where they launch as
programmatic dependents) and how ``tools/bench_kernels.py`` times them. The timing it replaces
launched each candidate alone after an L2 flush: at 05cc2b1 it kept "mmv" on 4096^2 W4 at M = 16
over "mma:2x16" by 15.4 against 16.3 us, and the kept kernel replayed at 13.0 us in the
benchmark where "mma:2x16" had replayed at 11.05 (docs/KERNELS-NOTES.md, round 15). A Python
launch inside the timed region also counted the host's launch path (112077f: 77-189 us read for
Triton kernels that replay in 11-22 us); a graph has none.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable

import torch

from gift_quant.kernels import ACTIVATION_DTYPES

log = logging.getLogger(__name__)

TUNE_REPS = 5
GRAPH_CALLS = 8  # the fewest launches per timed graph
MAX_COPIES = 32  # the most weight copies (the layer counted): a 4096^2 W2 layer needs 19

_kept: dict[tuple, str] = {}  # key -> kernel
_timings: dict[tuple, dict[str, float]] = {}  # key -> {kernel: seconds} as measured
_FIELDS = ("device", "N", "K", "bits", "group", "salient", "m_bucket", "dtype", "cuda_layout")
_DTYPE_NAMES = {dtype: name for name, dtype in ACTIVATION_DTYPES.items()}


def m_bucket(M: int) -> int:
    """The M a measurement is kept for: calls with M rows share the kernel of M_bucket rows
    (the CUDA kernel stages 16 rows for M <= 16, 32 for M <= 32; past 32, powers of two: the
    warpgroup kernel's tiles are 64, 128 and 256 rows). One row and two apart from 3-4: the
    GEMV, which reads the weights once per row, is a candidate there, in configurations of
    their own (one row: ``gemv.gemv_names``)."""
    if M <= 32:
        return M if M <= 2 else 4 if M <= 4 else 8 if M <= 8 else 16 if M <= 16 else 32
    return 1 << (M - 1).bit_length()


def key(
    device,
    N: int,
    K: int,
    bits: int,
    group: int,
    nsal: int,
    M: int,
    dtype: torch.dtype,
    cuda_layout: bool,
) -> tuple:
    """What a measurement is kept for: the layer, the M bucket, the activations' type and
    whether the call has the CUDA kernels' layout (a call without it, a training forward say,
    times the Triton kernels alone and must not take a CUDA kernel kept for a call with it)."""
    return (device, N, K, bits, group, nsal, m_bucket(M), _DTYPE_NAMES[dtype], cuda_layout)


def kept(k: tuple) -> str | None:
    """The kernel measured (or fixed) for ``k``, if any."""
    return _kept.get(k)


def copies_for(layer_bytes: int, device: torch.device) -> int:
    """How many copies of a layer's weights (``layer_bytes`` each, the layer itself counted)
    the timed launches cycle over so that together they pass twice ``device``'s L2 cache (at
    most MAX_COPIES)."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(MAX_COPIES, -(-2 * l2 // max(1, layer_bytes))))


def choose(
    k: tuple,
    names: list[str],
    launches: Callable[[], list[Callable[[str], None]]],
    rule: str,
    device: torch.device,
    timer=None,
) -> str:
    """The fastest of ``names`` for ``k``, measured now and kept; ``rule`` where nothing can be
    measured (``GIFT_QUANT_TUNE=0``, a call inside CUDA-graph capture, no GPU memory to spare,
    no candidate that launches), and kept too. ``launches()`` gives one launcher (name ->
    launch) per weight copy, the layer's own first (made here: only when timing). ``timer``
    (names, launches) -> {name: seconds} replaces the graph timing (tests)."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    times: dict[str, float] = {}
    if not capturing and os.environ.get("GIFT_QUANT_TUNE", "1") != "0":
        try:
            if timer is not None:
                times = timer(names, launches)
            else:
                with torch.cuda.device(device):  # graphs and launches on the layer's GPU
                    times = _time(names, launches())
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


def _time(names: list[str], launches: list[Callable[[str], None]]) -> dict[str, float]:
    """Median seconds per launch of each kernel that launches and captures (see the module
    docstring)."""
    calls = max(GRAPH_CALLS, len(launches))
    graphs = {}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    # the outer context gives the caller's stream back even where a failed capture leaves
    # torch.cuda.graph's own stream context unrestored
    with torch.cuda.stream(torch.cuda.current_stream()):
        for name in names:
            try:
                with torch.cuda.stream(stream):
                    launches[0](name)  # compiles a Triton kernel the first time
                g = torch.cuda.CUDAGraph()
                # thread-local: CUDA calls of the process's other threads (a server, a data
                # loader) are not capture errors meanwhile
                with torch.cuda.graph(g, stream=stream, capture_error_mode="thread_local"):
                    for i in range(calls):
                        launches[i % len(launches)](name)
                graphs[name] = g
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # a candidate that cannot run here is left out
                log.warning("kernel %s left out of tuning: %s", name, exc)
    torch.cuda.current_stream().wait_stream(stream)
    for g in graphs.values():
        g.replay()  # the first replay uploads the graph
    events: dict[str, list] = {n: [] for n in graphs}
    for _ in range(TUNE_REPS):
        for name, g in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {
        n: statistics.median(a.elapsed_time(b) for a, b in ev) / 1e3 / calls
        for n, ev in events.items()
    }
