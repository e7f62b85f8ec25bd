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


def _chain_layers(seed: int) -> list:
    """Four square W4 g128 layers with 32 salient columns and a bias, fp16, on the GPU."""
    from gift_quant.testing import random_mixed_linear

    return [
        random_mixed_linear(
            K,
            N,
            bits=4,
            group_size=128,
            num_salient=32,
            bias=True,
            seed=seed + i,
            device="cuda",
            dtype=torch.float16,
        )
        for i in range(4)
    ]


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
    from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle

    if gemv_wait == "before":
        monkeypatch.setattr(gemv, "PROGRAMS_PER_SM", 0)
    sm90 = torch.cuda.get_device_capability()[0] >= 9
    if os.environ.get("GIFT_QUANT_PDL", "1") != "0":  # the launches this test is about
        assert rules.dependent_launch(torch.device("cuda")) == sm90
    layers = _chain_layers(10)
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


# ------------------------------------------------------------------------------------------
# the decode GEMV's L2 prefetch of the next layer's weights


def test_the_prefetch_plan_takes_the_smallest_first_within_the_budget() -> None:
    """Three tensors, the smallest first; the one that passes the budget cut to whole 16-byte
    units of what is left; a strided view and a misaligned one left out (a bulk prefetch
    takes contiguous 16-byte aligned ranges)."""
    from gift_quant.kernels.triton.gemv import plan_prefetch

    big = torch.zeros(1 << 18, dtype=torch.int32)  # 1 MiB
    mid = torch.zeros(25_000, dtype=torch.int32)  # 100,000 bytes
    small = torch.zeros(1024, dtype=torch.int32)  # 4 KiB
    strided = torch.zeros(64, 64, dtype=torch.int32).t()
    odd = torch.zeros(4096, dtype=torch.int8)[1:]  # one byte past an aligned start
    budget = 600_000
    got = plan_prefetch([big, strided, mid, odd, small], budget)
    rest = (budget - 4096 - 100_000) // 16 * 16
    assert got == [(small.data_ptr(), 4096), (mid.data_ptr(), 100_000), (big.data_ptr(), rest)]
    assert plan_prefetch([big, mid], 4096) == [(mid.data_ptr(), 4096)]
    assert plan_prefetch([big], 15) == []


def test_each_layer_learns_the_layer_called_after_it() -> None:
    """``prefetch_next`` links each layer to the one called after it on the same device (the
    last to the first across a step), relinks when the order changes, and keeps calls on
    another device apart; it returns nothing to prefetch off CUDA."""
    from gift_quant.kernels.triton import ops

    ops._last_called.clear()
    a, b, c, other = (torch.nn.Linear(2, 2) for _ in range(4))
    x = torch.zeros(1, 2)
    for layer in (a, b, c, a, b, c):
        assert ops.prefetch_next(layer, x) == ()
    assert [m._next_called[0] for m in (a, b, c)] == [b, c, a]
    ops.prefetch_next(other, torch.zeros(1, 2, device="meta"))  # another device: no link
    ops.prefetch_next(b, x)  # c -> b now
    assert c._next_called[0] is b and not hasattr(other, "_next_called")
    assert a not in dict(c.named_modules()).values()  # no submodule registered
    ops._last_called.clear()


@pytest.mark.gpu
@needs_cuda
def test_the_gemv_prefetch_of_the_next_layer_changes_no_result(monkeypatch) -> None:
    """Four M = 1 layers chained, each GEMV bringing the next layer's codes, scales and
    salient weights into L2 (the last the first's) in one bulk prefetch per region or line by
    line, eager and in a CUDA graph: every output within the kernels' error bound of the
    float64 oracle, as without the prefetch (the split-K sums add in a varying order, so two
    runs need not agree bit for bit). And through the layers' own calls
    (``kernels.dequant_matmul``) twice: each layer learnt its successor, and the second pass,
    which prefetches, is as accurate."""
    from gift_quant.kernels import dequant_matmul, reference
    from gift_quant.kernels.triton import dispatch, ops
    from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle

    layers = _chain_layers(20)
    preps = [ops.prepare(layer) for layer in layers]
    x0 = torch.randn(1, K, device="cuda", dtype=torch.float16)

    def chain(outs: list[torch.Tensor], prefetch: bool) -> None:
        x = x0
        for i, (layer, p, out) in enumerate(zip(layers, preps, outs, strict=True)):
            nxt = preps[(i + 1) % len(preps)]
            pf = (nxt.q, nxt.sz, nxt.wst) if prefetch else ()
            args = (x, p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
            dispatch.run_route("gemv", *args, out=out, prefetch=pf)
            x = out

    def outs() -> list[torch.Tensor]:
        return [torch.empty(1, N, device="cuda", dtype=torch.float16) for _ in layers]

    def check(ys: list[torch.Tensor], how: str) -> None:
        x = x0
        for i, (layer, y) in enumerate(zip(layers, ys, strict=True)):
            err, ref_err = kernel_error(y, reference.dequant_matmul(x, layer), oracle(x, layer))
            assert err <= ERROR_FACTOR * ref_err + 1e-6, (how, i, err, ref_err)
            x = y

    if rules.l2_prefetch(torch.device("cuda")):
        from gift_quant.kernels.triton.gemv import prefetch_regions

        assert len(prefetch_regions((preps[1].q, preps[1].sz, preps[1].wst), x0.device)) == 3
    for mode in ("1", "lines"):
        monkeypatch.setenv("GIFT_QUANT_L2_PREFETCH", mode)
        for prefetch in (False, True):
            ys = outs()
            chain(ys, prefetch)
            torch.cuda.synchronize()
            check(ys, f"eager {mode} {prefetch}")
        ys = outs()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(ys, True)
        graph.replay()
        torch.cuda.synchronize()
        check(ys, f"graph {mode}")

    ops._last_called.clear()
    with torch.no_grad():
        passes = []
        for _ in range(2):
            x, ys = x0, []
            for layer in layers:
                x = dequant_matmul(x, layer)
                ys.append(x)
            passes.append(ys)
    torch.cuda.synchronize()
    assert [m._next_called[0] for m in layers] == layers[1:] + layers[:1]
    assert len(ops.prefetch_next(layers[0], x0)) == 3
    for ys in passes:
        check(ys, "layers")
    ops._last_called.clear()
