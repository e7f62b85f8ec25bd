"""The first-use timing (``kernels/triton/tuning``) against an independent clock.

The timing replays each candidate in a CUDA graph over copies of the weights; it must read
what ``testing.graph_time_us`` (the benchmarks' clock) reads for the same launches, and never
the host's launch path (at 112077f an event-timed Python launch read 77-189 us for Triton
kernels that replay in 11-22 us).
"""

from __future__ import annotations

import pytest
import torch

from gift_quant.kernels.triton import dispatch, ops, tuning
from gift_quant.mixed_linear import MixedLinear
from gift_quant.testing import graph_time_us, random_quantized, sustained_time_us

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# (kernel, layer size, M): the cells whose readings were furthest off at 112077f
CASES = [("mm:t64k", 4096, 16), ("mm:t64", 4096, 16), ("gemv", 5120, 4)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=[f"{n}-{k}-M{m}" for n, k, m in CASES])
def test_first_use_timing_reads_what_the_graph_replay_reads(case) -> None:
    name, size, M = case
    qw, b = random_quantized(size, size, 4, 128, 128, False, 0, False)
    layers = [MixedLinear.from_quantized(qw, b, dtype=torch.float16).cuda() for _ in range(3)]
    packed = [ops.prepare(layer) for layer in layers]
    x = torch.randn(M, size, device="cuda", dtype=torch.float16)
    out = torch.empty(M, size, device="cuda", dtype=torch.float16)

    def launcher(p):
        def launch(kernel: str) -> None:
            dispatch.run_route(
                kernel, x, p.q, p.sz, p.wst, p.sidx, p.sal_pos, None, 4, 128, out=out
            )

        return launch

    launches = [launcher(p) for p in packed]
    first_use = tuning._time([name], launches)[name]
    calls = [lambda f=f: f(name) for f in launches] * 8
    replay = graph_time_us(calls) / 1e6
    assert 0.7 * replay <= first_use <= 1.3 * replay, (first_use, replay)


@pytest.mark.gpu
@needs_cuda
def test_the_steady_state_clock_reads_what_a_burst_reads_below_the_power_limit() -> None:
    """``sustained_time_us`` (``bench_kernels --sustained``) times the same graph as
    ``graph_time_us``, only for longer: on M = 16 matmuls, which keep the board far from its
    power limit, both read the same time within 30%; a window too short for one timed replay
    is refused, not read as zero."""
    x = torch.randn(16, 4096, device="cuda", dtype=torch.float16)
    ws = [torch.randn(4096, 4096, device="cuda", dtype=torch.float16) for _ in range(8)]
    calls = [lambda w=w: x @ w.t() for w in ws] * 8  # a replay of about 1 ms: no host gaps
    burst, steady = graph_time_us(calls), sustained_time_us(calls, 0.4)
    assert 0.7 * burst <= steady <= 1.3 * burst, (burst, steady)
    with pytest.raises(ValueError, match="too short"):
        sustained_time_us(calls, 1e-9)


MIB = 1 << 20


@pytest.mark.parametrize(
    "l2, layer, copies",
    [
        (50 * MIB, 9 * MIB, 12),  # 12 x 9 = 108 MiB > 100
        (50 * MIB, 2 * MIB, 32),  # 50 would be needed: capped at MAX_COPIES
        (50 * MIB, 18 * MIB, 6),  # 6 x 18 = 108 MiB
        (60 * MIB, 18 * MIB, 7),  # 7 x 18 = 126 MiB > 120
        (50 * MIB, 59 * MIB, 2),
        (50 * MIB, 120 * MIB, 1),  # one layer alone passes twice the L2
        (4 * MIB, 1 * MIB, 8),
        (4 * MIB, 9 * MIB, 1),
    ],
)
def test_the_copies_pass_twice_the_l2_cache(monkeypatch, l2, layer, copies) -> None:
    """As many weight copies (the layer counted) as make the timed launches read past twice
    the L2 (of 50, 60 and 4 MiB), at most MAX_COPIES."""

    class Props:
        L2_cache_size = l2

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    assert tuning.MAX_COPIES == 32
    assert tuning.copies_for(layer, torch.device("cuda", 0)) == copies
