"""Programmatic dependent launch (sm_90+, ``rules.dependent_launch``): a kernel may start while
the one before it finishes and reads its weights meanwhile, but must read x, and touch the
shared split-K workspace, only after the previous kernel is done. Which GEMV launches take it
is checked on the CPU. On a GPU, chains of layers where each layer's x is the previous
layer's output, written into NaN-filled buffers: a read before the previous kernel finished
would see NaN or a partial sum, and a workspace touched early would corrupt the previous
layer's split-K sum."""

from __future__ import annotations

import os

import pytest
import torch

from gift_quant.kernels.cuda import native, rules

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

K = N = 1024  # square, so that each layer's output is the next layer's input


def _names(M: int) -> list[str]:
    from gift_quant.kernels.triton import routes

    names = ["gemv"] if M <= 8 else []
    if native.library() is not None:
        if M <= rules.MMV_MAX_M:
            wn, splits = rules.mmv_choose(M, N, K)
            names.append(routes.mmv_name(wn, splits))
            if rules.clusters_supported() and M > 4:  # 8 splits summed in one cluster
                names.append(routes.mmv_name(wn, 8, rules.MMV_DEPTH, 8))
        names.append(routes.mma_name(*rules.choose(M, N, K)))
    return names


def test_the_gemv_waits_in_its_k_loop_within_one_wave_and_before_it_past_one() -> None:
    """The decode GEMV launches as a dependent: within one wave (21 programs per SM) waiting
    in its first k-block (faster on the H200 where it fits), past one wave waiting before its
    k-loop (the wait in the loop took 32-36% longer there at W4); the wait in the loop never
    where a program could skip it (more K splits than k-blocks) or Triton would issue the x
    loads ahead of it (more than one pipeline stage); M > 1 past one wave: ordinary launches."""
    from gift_quant.kernels.triton.gemv import dependent_wait, gemv_config

    sms, nsal = 132, 128
    for N, K, want in [
        (4096, 4096, "loop"),  # 1,088 programs
        (4096, 14336, "loop"),
        (12288, 4096, "loop"),  # 1,728
        (28672, 4096, "before"),  # 3,360 > 21 x 132
        (8192, 28672, "before"),  # 5,888
    ]:
        cfg = gemv_config(1, N, K, 4, 128, nsal, sms)
        assert dependent_wait(cfg, N, K, nsal, sms) == want, (N, K)
    cfg = gemv_config(1, 4096, 4096, 4, 128, nsal, sms)
    assert dependent_wait(cfg | {"num_stages": 2}, 4096, 4096, nsal, sms) == "before"
    many = cfg | {"n_split": 2 * (4096 // cfg["BLOCK_K"])}  # half the programs own no k-block
    assert dependent_wait(many, 4096, 4096, nsal, 10 * sms) == "before"
    wide = gemv_config(4, 28672, 4096, 4, 128, nsal, sms)  # M = 4: 3,360 programs
    assert dependent_wait(wide, 28672, 4096, nsal, sms) is None
    assert dependent_wait(wide, 28672, 4096, nsal, 10 * sms) == "loop"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "M, gemv_wait", [(1, "loop"), (1, "before"), (4, "loop"), (16, "loop")], ids=str
)
def test_chained_kernels_read_the_previous_output(monkeypatch, M: int, gemv_wait: str) -> None:
    """Four layers chained through NaN-filled outputs, eager and in a CUDA graph, for every
    kernel that serves M rows here: a launch that read x, its workspace or its counters before
    the previous kernel finished would read NaN or stale partial sums. ``gemv_wait="before"``:
    the GEMV waits before its k-loop, as it does past one wave (forced by a bound of 0)."""
    from gift_quant.kernels import reference
    from gift_quant.kernels.triton import dispatch, gemv, ops
    from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle, random_mixed_linear

    if gemv_wait == "before":
        monkeypatch.setattr(gemv, "PROGRAMS_PER_SM", 0)
    sm90 = torch.cuda.get_device_capability()[0] >= 9
    if os.environ.get("GIFT_QUANT_PDL", "1") != "0":  # the launches this test is about
        assert rules.dependent_launch(torch.device("cuda")) == sm90
    layers = [
        random_mixed_linear(
            K,
            N,
            bits=4,
            group_size=128,
            num_salient=32,
            bias=True,
            seed=10 + i,
            device="cuda",
            dtype=torch.float16,
        )
        for i in range(4)
    ]
    preps = [(ops.prepare(layer), ops.cuda_layout(layer)) for layer in layers]
    x0 = torch.randn(M, K, device="cuda", dtype=torch.float16)

    def chain(name: str, outs: list[torch.Tensor]) -> None:
        x = x0
        for layer, (p, cuda), out in zip(layers, preps, outs, strict=True):
            args = (x, p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
            dispatch.run_route(name, *args, out=out, cuda=cuda)
            x = out

    def check(name: str, outs: list[torch.Tensor], how: str) -> None:
        x = x0
        for i, (layer, out) in enumerate(zip(layers, outs, strict=True)):
            assert not out.isnan().any(), (name, how, i)
            err, ref_err = kernel_error(out, reference.dequant_matmul(x, layer), oracle(x, layer))
            assert err <= ERROR_FACTOR * ref_err + 1e-6, (name, how, i, err, ref_err)
            x = out

    def nans() -> list[torch.Tensor]:
        return [
            torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16) for _ in layers
        ]

    for name in _names(M):
        outs = nans()
        chain(name, outs)  # eager: compiles, sizes the workspace
        torch.cuda.synchronize()
        check(name, outs, "eager")
        outs = nans()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(name, outs)
        graph.replay()
        for out in outs:  # NaN again: an early read in the checked replay would see it
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(name, outs, "graph")
