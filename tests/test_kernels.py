"""The torch reference, the backend dispatch, the PTX unpacking plans (CPU), and the Triton
kernels: under the Triton interpreter where Triton imports (CPU), on the GPU where CUDA exists.

Kernel results are bounded by the reference's own error against a float64 oracle (STYLE.md E9).
"""

import importlib.util
import os
import struct

import pytest
import torch

from gift_quant.kernels import Backend, base_matmul, dequant_matmul, reference, resolve_backend
from gift_quant.kernels.testing import ERROR_FACTOR, kernel_error, oracle, random_mixed_linear
from gift_quant.kernels.triton.ptx import emulate, pack_3bit, plan, step_order, zero_consts
from gift_quant.quant.packing import pack_rows

HAS_TRITON = importlib.util.find_spec("triton") is not None
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ------------------------------------------------------------------------------------------
# reference and dispatch (CPU)


def test_reference_matches_float64_oracle_within_fp16_rounding():
    layer = random_mixed_linear(256, 128, bits=4, num_salient=16, bias=True, seed=1)
    x = torch.randn(3, 256, dtype=torch.float16)
    exact = oracle(x, layer)
    y = reference.dequant_matmul(x.float(), layer.float())
    assert torch.allclose(y.double(), exact, rtol=1e-5, atol=1e-5)


def test_base_matmul_is_differentiable_in_x_and_excludes_salient_and_bias():
    layer = random_mixed_linear(128, 64, bits=3, num_salient=8, bias=True, seed=2).double()
    x = torch.randn(4, 128, dtype=torch.float64, requires_grad=True)
    y = base_matmul(x, layer, Backend.TORCH)
    assert torch.allclose(y, oracle(x.detach(), layer, base_only=True))
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_resolve_backend_on_cpu():
    x = torch.zeros(2, 8)
    assert resolve_backend(Backend.TORCH, x) is Backend.TORCH
    assert resolve_backend("auto", x) is Backend.TORCH
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        resolve_backend(Backend.TRITON, x)


def test_auto_falls_back_to_the_reference_on_cpu():
    layer = random_mixed_linear(128, 64, bits=2, num_salient=4, seed=3, dtype=torch.float32)
    x = torch.randn(5, 128)
    assert torch.equal(dequant_matmul(x, layer), reference.dequant_matmul(x, layer))
    assert torch.equal(layer(x), reference.dequant_matmul(x, layer))


# ------------------------------------------------------------------------------------------
# PTX unpacking plans, replayed bit by bit (CPU)


@pytest.mark.parametrize("kind", ["f16", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_plan_recovers_code_minus_zero_from_the_kernel_layout(bits, kind):
    gen = torch.Generator().manual_seed(bits)
    p = plan(bits, kind)
    K, N = 128, 16
    codes = torch.randint(0, 2**bits, (K, N), generator=gen)
    zero = torch.randint(0, 2**bits, (K // p.unit_k, N), generator=gen)
    words = pack_3bit(codes) if bits == 3 else pack_rows(codes, bits)
    units = words.reshape(K // p.unit_k, p.unit_words, N)
    got = emulate(p, [units[:, t] for t in range(p.unit_words)], zero)
    want = codes.reshape(K // p.unit_k, p.unit_k, N).permute(0, 2, 1) - zero[..., None]
    assert torch.equal(got, want.double())
    assert sorted(step_order(bits)) == list(range(p.unit_k))


@pytest.mark.parametrize("kind", ["f16", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_zero_constants_are_the_negated_magic_plus_zero_in_both_halves(bits, kind):
    mant = 10 if kind == "f16" else 7
    for (mult, add), pos in zip(
        zero_consts(plan(bits, kind)), plan(bits, kind).positions, strict=True
    ):
        for z in range(2**bits):
            v = (z * mult + add) & 0xFFFFFFFF
            assert v & 0xFFFF == v >> 16
            h = v & 0xFFFF
            if kind == "f16":
                f = struct.unpack("<e", struct.pack("<H", h))[0]
            else:
                f = struct.unpack("<f", struct.pack("<I", h << 16))[0]
            assert f == -(2.0 ** (mant - pos) + z)


# ------------------------------------------------------------------------------------------
# Triton kernels: interpreter (CPU, where Triton imports) and GPU


def _triton_ops():
    from gift_quant.kernels.triton import ops as triton_ops

    return triton_ops


@pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton interpreter runs with TRITON_INTERPRET=1 set before triton imports",
)
@pytest.mark.parametrize(("bits", "M"), [(4, 1), (3, 2), (2, 16), (4, 20)])
def test_interpreted_kernels_match_the_reference(bits, M):
    ops = _triton_ops()
    layer = random_mixed_linear(256, 128, bits=bits, num_salient=12, bias=True, seed=bits + M)
    x = torch.randn(M, 256, dtype=torch.float16)
    out = ops.dequant_matmul(x, layer)
    err, ref_err = kernel_error(out, reference.dequant_matmul(x, layer), oracle(x, layer))
    assert err <= ERROR_FACTOR * ref_err + 1e-6


@pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton interpreter runs with TRITON_INTERPRET=1 set before triton imports",
)
@pytest.mark.parametrize(
    ("name", "M"),
    [("mm:t128", 5), ("mm:t64", 16), ("mm:n128", 20), ("mm:t128w", 40), ("mm:t64k", 32)]
    + [("mm:t64", 130), ("mm:t128s", 9), ("gemm", 9), ("cublas", 33), ("gemv", 7)],
)
def test_interpreted_route_kernels_match_the_reference(name, M):
    ops = _triton_ops()
    for bits in (2, 3, 4):
        layer = random_mixed_linear(
            256, 128, bits=bits, group_size=64, num_salient=12, bias=True, seed=bits + M
        )
        p = ops.prepare(layer)
        x = torch.randn(M, 256, dtype=torch.float16)
        args = (p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
        out = ops.run_route(name, x, *args)
        err, ref_err = kernel_error(out, reference.dequant_matmul(x, layer), oracle(x, layer))
        assert err <= ERROR_FACTOR * ref_err + 1e-6, (bits, err, ref_err)


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package")
def test_route_tables_only_name_candidate_kernels():
    ops = _triton_ops()
    tables = [*ops.DEFAULT_ROUTES.values(), *ops.ROUTES.values()]
    for M in range(1, 600):
        for N, K, bits in [(0, 0, 0), (64, 64, 3), *ops.ROUTES]:
            assert ops.route(M, N, K, bits) in ops.candidates(M)
    for table in tables:
        assert [m for m, _ in table] == sorted(m for m, _ in table)
    broken = {"mm:n128w", "mm:t128x8", "mm:n128x8"}  # intermittently wrong on the H200
    assert not broken & {n for M in range(1, 600) for n in ops.candidates(M)}


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_triton_matches_reference(bits, m, dtype):
    layer = random_mixed_linear(
        512, 256, bits=bits, num_salient=32, bias=True, seed=bits, device="cuda", dtype=dtype
    )
    x = torch.randn(m, 512, device="cuda", dtype=dtype)
    out = dequant_matmul(x, layer, backend=Backend.TRITON)
    err, ref_err = kernel_error(out, reference.dequant_matmul(x, layer), oracle(x, layer))
    # the kernel may not be worse than twice the reference's own error
    assert err <= ERROR_FACTOR * ref_err + 1e-6


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [2, 64])
def test_triton_base_matmul_backward(m):
    layer = random_mixed_linear(512, 256, bits=4, num_salient=16, seed=9, device="cuda")
    x = torch.randn(m, 512, device="cuda", dtype=torch.float16, requires_grad=True)
    y = base_matmul(x, layer, Backend.TRITON)
    gy = torch.randn_like(y)
    y.backward(gy)
    w = oracle(torch.eye(512, device="cuda", dtype=torch.float64), layer, base_only=True)
    err, ref_err = kernel_error(x.grad, gy @ w.t().half(), gy.double() @ w.t())
    assert err <= ERROR_FACTOR * ref_err + 1e-6


@gpu
@needs_cuda
def test_triton_under_cuda_graph_replay():
    layer = random_mixed_linear(512, 256, bits=4, num_salient=16, seed=4, device="cuda")
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    dequant_matmul(x, layer, Backend.TRITON)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = dequant_matmul(x, layer, Backend.TRITON)
    x.copy_(torch.randn_like(x))
    g.replay()
    err, ref_err = kernel_error(y, reference.dequant_matmul(x, layer), oracle(x, layer))
    assert err <= ERROR_FACTOR * ref_err + 1e-6
