"""The torch reference, the backend dispatch, the PTX unpacking plans, and the Triton kernels.

The Triton kernels run on the GPU where CUDA exists, else on the CPU through the Triton
interpreter (this module sets TRITON_INTERPRET=1 before the kernels are defined), so the
default test command covers them. Expected values come from a float64 oracle computed here
from the raw codes, zero-points and scales (not from the packed buffers or the reference);
a kernel's error may not exceed ``ERROR_FACTOR`` times the torch reference's own error.
"""

import os
import struct

import pytest
import torch

# before any kernel module is imported: triton.jit decides at definition time whether a kernel
# is compiled for the GPU or run by the interpreter (and Triton checks the variable again at
# every launch: the autouse fixture below sets it while this module's tests run)
CUDA = torch.cuda.is_available()
_SAVED = os.environ.get("TRITON_INTERPRET")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


from gift_quant.kernels import (  # noqa: E402
    Backend,
    base_matmul,
    dequant_matmul,
    reference,
    resolve_backend,
)
from gift_quant.kernels.cuda import layout, native, rules  # noqa: E402
from gift_quant.kernels.triton import dispatch, mm, ops, routes, tuning  # noqa: E402
from gift_quant.kernels.triton.gemv import gemv_names  # noqa: E402
from gift_quant.kernels.triton.ptx import emulate, pack_3bit, plan, zero_consts  # noqa: E402
from gift_quant.kernels.triton.tiles import interpreting  # noqa: E402
from gift_quant.mixed_linear import MixedLinear  # noqa: E402
from gift_quant.quant.packing import pack_rows  # noqa: E402
from gift_quant.testing import ERROR_FACTOR, kernel_error, random_quantized  # noqa: E402

if _SAVED is None:  # the rest of the test session runs without the variable
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _SAVED

DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
F16, BF16 = torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make(K, N, *, bits, group=64, salient=0, bias=False, sym=False, seed=0, dtype=F16):
    """(MixedLinear on DEV, exact W [N, K] float64 with the salient columns in place, bias)."""
    qw, b = random_quantized(K, N, bits, group, salient, bias, seed, sym)
    layer = MixedLinear.from_quantized(qw, b, dtype=dtype).to(DEV)
    g = qw.g_idx.long()
    w = (qw.codes.double() - qw.zeros.double()[:, g]) * qw.scales.double()[:, g]
    w[:, qw.salient_idx] = qw.salient_weight.double()  # their codes sit at the zero-point
    return layer, w.to(DEV), None if b is None else layer.bias.double()


def exact(x, w, b=None):
    y = x.double() @ w.t()
    return y if b is None else y + b


def within_bound(out, x, layer, w, b):
    """The kernel's max error against the oracle is at most ERROR_FACTOR x the reference's."""
    ref = reference.dequant_matmul(x, layer)
    err, ref_err = kernel_error(out, ref, exact(x, w, b))
    assert ref_err < 0.05 * float(exact(x, w, b).abs().max())  # the oracle agrees with the spec
    assert err <= ERROR_FACTOR * ref_err + 1e-6, (err, ref_err)


def test_kernels_are_interpreted_without_cuda():
    assert interpreting() is not CUDA, "a kernel module was imported before TRITON_INTERPRET"


# ------------------------------------------------------------------------------------------
# reference and dispatch


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_reference_matches_the_oracle_from_raw_codes(bits):
    layer, w, b = make(256, 128, bits=bits, salient=16, bias=True, seed=bits)
    layer = layer.cpu().double()
    x = torch.randn(3, 256, dtype=torch.float64)
    assert torch.allclose(reference.dequant_matmul(x, layer), exact(x, w.cpu(), b.cpu()))


def test_base_matmul_is_differentiable_in_x_and_excludes_salient_and_bias():
    layer, w, _ = make(128, 64, bits=3, salient=8, bias=True, seed=2)
    layer = layer.cpu().double()
    w = w.cpu()
    w[:, layer.salient_idx.long()] = 0
    x = torch.randn(4, 128, dtype=torch.float64, requires_grad=True)
    y = base_matmul(x, layer, Backend.TORCH)
    assert torch.allclose(y, exact(x.detach(), w))
    gy = torch.randn_like(y)
    y.backward(gy)
    assert torch.allclose(x.grad, gy @ w)


def test_resolve_backend_on_cpu():
    x = torch.zeros(2, 8)
    assert resolve_backend(Backend.TORCH, x) is Backend.TORCH
    assert resolve_backend("auto", x) is Backend.TORCH
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        resolve_backend(Backend.TRITON, x)


def test_auto_falls_back_to_the_reference_on_cpu():
    layer, _, _ = make(128, 64, bits=2, salient=4, seed=3, dtype=torch.float32)
    layer = layer.cpu()
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
# Triton kernels (GPU, or the interpreter on the CPU): small shapes, the interpreter is slow

# (route, bits, dtype, M, group, sym, salient, bias); N = 64. With these sizes "mm:t64" (group
# 128) and the second "mm:n128" (group -1) run one program per tile (DIRECT); the other mm
# cases and the GEMV split K (workspace epilogue, salient programs).
ROUTE_CASES = [
    ("gemv", 4, F16, 1, 64, False, 6, True),
    ("gemv", 3, BF16, 1, 32, True, 0, False),
    ("gemv", 2, F16, 3, -1, True, 5, True),
    ("gemv:32x4", 4, F16, 1, 64, False, 6, True),  # the configurations timed at first use
    ("gemv:64x3", 3, BF16, 2, 64, True, 5, False),  # (4 k-blocks over 3 splits: uneven)
    ("gemv:64x4", 2, F16, 1, 128, False, 0, True),  # (the rule: 128 x 2)
    ("mm:t64k", 4, F16, 5, 64, False, 7, True),
    ("mm:t64k", 2, BF16, 16, 32, False, 3, False),
    ("mm:t64", 3, F16, 9, 128, False, 33, True),
    ("mm:t128s", 4, BF16, 7, 64, True, 5, True),
    ("mm:t128", 3, BF16, 20, 64, False, 6, False),
    ("mm:n128", 2, F16, 13, 64, True, 4, True),
    ("mm:n128", 4, BF16, 6, -1, False, 9, True),
    ("mm:t128w", 3, F16, 40, 64, False, 5, True),
    ("mm:t128w", 2, BF16, 33, 128, True, 0, True),
    ("mm:t128wr", 4, F16, 64, 64, False, 9, True),
    ("cublas", 4, BF16, 11, 64, False, 8, True),
    ("cublas", 3, F16, 6, 32, True, 3, False),
]


@pytest.mark.parametrize(
    ("name", "bits", "dtype", "M", "group", "sym", "nsal", "bias"), ROUTE_CASES
)
def test_route_kernels_match_the_oracle(name, bits, dtype, M, group, sym, nsal, bias):
    layer, w, b = make(
        256, 64, bits=bits, group=group, salient=nsal, bias=bias, sym=sym, seed=M, dtype=dtype
    )
    p = ops.prepare(layer)
    x = torch.randn(M, 256, device=DEV, dtype=dtype)
    out = torch.full((M, 64), float("nan"), device=DEV, dtype=dtype)
    args = (p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
    dispatch.run_route(name, x, *args, out=out)
    within_bound(out, x, layer, w, b)


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequantize_kernel_equals_the_reference_weight_bit_for_bit(bits, dtype):
    layer, w, _ = make(128, 128, bits=bits, group=32, salient=5, seed=bits, dtype=dtype)
    p = ops.prepare(layer)
    got = mm.dequantize(p.q, p.sz, p.wst, p.sal_pos, 128, bits=bits, group=32, dtype=dtype)
    want = reference.dequantize_weight(
        layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, dtype
    )
    sal = layer.salient_idx.long()
    want[sal] = layer.salient_weight.t().to(dtype)
    assert torch.equal(got, want)
    assert torch.allclose(got.double(), w.t(), rtol=1e-2, atol=0)  # and both are the oracle's


@pytest.mark.parametrize(("noise", "std"), [("normal", 0.5), ("uniform", 12**-0.5)])
def test_noisy_dequantize_adds_seeded_noise_of_scale_delta_off_the_salient_rows(noise, std):
    """GIFT-SW's training weight in one launch: the grid plus delta[n] x unit noise on the
    non-salient rows, the same for the same seed, the salient rows exactly W_S^T."""
    K, N = 256, 128
    layer, _, _ = make(K, N, bits=3, group=64, salient=6, seed=5, dtype=F16)
    p = ops.prepare(layer)
    delta = torch.rand(N, generator=torch.Generator().manual_seed(0)).add_(0.5).to(DEV)
    wst = torch.randn(6, N, device=DEV, dtype=F16)
    kw = dict(bits=3, group=64, dtype=F16, delta=delta)
    clean = mm.dequantize(p.q, p.sz, wst, p.sal_pos, K, **kw)
    a = mm.dequantize(p.q, p.sz, wst, p.sal_pos, K, noise=noise, seed=3, **kw)
    b = mm.dequantize(p.q, p.sz, wst, p.sal_pos, K, noise=noise, seed=3, **kw)
    c = mm.dequantize(p.q, p.sz, wst, p.sal_pos, K, noise=noise, seed=4, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    sal = layer.salient_idx.long()
    assert torch.equal(a[sal], wst) and torch.equal(clean[sal], wst)
    rest = torch.ones(K, dtype=torch.bool, device=DEV)
    rest[sal] = False
    unit = ((a.double() - clean.double()) / delta.double()[None, :])[rest]
    assert abs(float(unit.mean())) < 0.02 and abs(float(unit.std()) / std - 1) < 0.03
    if noise == "uniform":  # bounded by half a step, up to the fp16 rounding of the sum
        assert float(unit.abs().max()) <= 0.5 + 2e-2


def test_gift_training_through_the_triton_rebuild_has_exact_gradients(monkeypatch):
    """GiftLinear on the Triton rebuild (forced here; on a GPU it is the default): the output
    and both gradients are those of an explicit product with the weight rebuilt from the seed."""
    from gift_quant.train.gift_linear import GiftLinear

    monkeypatch.setattr(GiftLinear, "_triton", lambda self, device: True)
    layer, _, _ = make(128, 64, bits=4, group=32, salient=5, bias=True, seed=2, dtype=F16)
    g = GiftLinear.from_mixed(layer, "normal", bits=4).to(DEV).train()
    g.noise_seed = 9
    x = torch.randn(2, 3, 128, device=DEV, dtype=F16, requires_grad=True)
    y = g(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    wt = ops.noisy_weight_t(layer, g.salient_weight.detach().t(), "normal", g.delta, 9, F16)
    assert not torch.equal(wt, g.weight_t(F16, None, g.salient_weight))  # the noise is there
    assert torch.equal(y, x.detach() @ wt + g.bias.to(F16))
    assert torch.equal(x.grad, gy @ wt.t())
    xs = x.detach()[..., g.salient_idx.long()].reshape(-1, 5)
    want = (gy.reshape(-1, 64).t() @ xs).float()
    assert torch.equal(g.salient_weight.grad, want)


@pytest.mark.parametrize(
    ("shape", "dtype", "route"),
    [((1, 128), F16, "gemv"), ((2, 3, 128), BF16, "mm:t64k"), ((520, 128), F16, "cublas")],
)
def test_op_routes_by_rows(shape, dtype, route):
    layer, w, b = make(128, 64, bits=4, group=64, salient=4, bias=True, seed=1, dtype=dtype)
    x = torch.randn(*shape, device=DEV, dtype=dtype)
    y = ops.dequant_matmul(x, layer)
    assert y.shape == (*shape[:-1], 64)
    within_bound(y.reshape(-1, 64), x.reshape(-1, 128), layer, w, b)
    assert routes.route(x.reshape(-1, 128).shape[0], 64, 128, 4) == route


@pytest.mark.parametrize(("bits", "dtype", "M"), [(4, F16, 3), (3, BF16, 20), (2, F16, 17)])
def test_training_backward_matches_the_oracle(bits, dtype, M):
    layer, w, _ = make(128, 64, bits=bits, group=32, salient=6, seed=bits, dtype=dtype)
    w[:, layer.salient_idx.long()] = 0  # base_matmul: no salient product
    x = torch.randn(M, 128, device=DEV, dtype=dtype, requires_grad=True)
    y = ops.base_matmul(x, layer)
    gy = torch.randn_like(y)
    y.backward(gy)
    wt = reference.dequantize_weight(
        layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, dtype
    )
    err, ref_err = kernel_error(x.grad, gy @ wt.t(), gy.double() @ w)
    assert err <= ERROR_FACTOR * ref_err + 1e-6, (err, ref_err)


def test_op_backward_with_the_cuda_layout_passed():
    """The op as ``dequant_matmul`` calls it where the CUDA kernels' layout exists (four more
    tensors: the real ones where the kernels are built, stand-ins the op leaves unused on the
    CPU): grad_x is one gradient among as many as the inputs, the same as without the
    layout, and within the oracle bound."""
    layer, w, _ = make(128, 64, bits=4, group=32, salient=6, seed=4, dtype=BF16)
    p = ops.prepare(layer)
    c = ops.cuda_layout(layer)
    tensors = (
        [c.qc, c.zp, c.scp, c.salient_as(BF16)]
        if c is not None
        else [torch.zeros(4, dtype=torch.int32, device=DEV) for _ in range(4)]
    )
    x0 = torch.randn(3, 128, device=DEV, dtype=BF16)
    gy = torch.randn(3, 64, device=DEV, dtype=BF16)
    grads = []
    for extra in ([], tensors):
        x = x0.clone().requires_grad_(True)
        args = (p.q, p.sz, p.wst, p.sidx, p.sal_pos, None, p.bits, p.group)
        ops.mixed_matmul(x, *args, *extra).backward(gy)
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    wt = reference.dequantize_weight(
        layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, BF16
    ).clone()
    wt[layer.salient_idx.long()] = layer.salient_weight.t().to(BF16)
    err, ref_err = kernel_error(grads[1], gy @ wt.t(), gy.double() @ w)
    assert err <= ERROR_FACTOR * ref_err + 1e-6, (err, ref_err)


def test_route_tables_only_name_candidate_kernels():
    tables = [*routes.DEFAULT_ROUTES.values(), *routes.ROUTES.values()]
    for M in range(1, 600):
        for N, K, bits in [(0, 0, 0), (64, 64, 3), *routes.ROUTES]:
            assert routes.route(M, N, K, bits) in routes.candidates(M)
    for table in tables:
        assert [m for m, _ in table] == sorted(m for m, _ in table)
    names = {n for M in range(1, 600) for n in routes.candidates(M)}
    assert {n[3:] for n in names if n.startswith("mm:")} <= set(mm.MM_CONFIGS)


# ------------------------------------------------------------------------------------------
# GPU only


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_triton_backend_matches_the_oracle(bits, m, dtype):
    layer, w, b = make(
        512, 256, bits=bits, group=128, salient=32, bias=True, seed=bits, dtype=dtype
    )
    x = torch.randn(m, 512, device="cuda", dtype=dtype)
    within_bound(dequant_matmul(x, layer, backend=Backend.TRITON), x, layer, w, b)


@gpu
@needs_cuda
def test_triton_under_cuda_graph_replay():
    layer, w, b = make(512, 256, bits=4, group=128, salient=16, seed=4)
    x = torch.randn(1, 512, device="cuda", dtype=F16)
    dequant_matmul(x, layer, Backend.TRITON)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = dequant_matmul(x, layer, Backend.TRITON)
    x.copy_(torch.randn_like(x))
    g.replay()
    within_bound(y, x, layer, w, b)


def test_first_use_timing_keeps_the_fastest_kernel_per_shape_and_m_bucket(
    monkeypatch, stand_in_timer
):
    """Calls with the CUDA kernel's layout time its configurations and the rule's Triton
    route once per (device, shape, M bucket, dtype) and keep the fastest (one row: the GEMV's
    configurations); past TUNE_M or with GIFT_QUANT_TUNE=0 the rule serves. The timer here is
    a stand-in whose winner is set by the test (the CUDA-event timer needs a GPU)."""
    # the names below are those of a device without thread-block clusters, whatever this
    # machine has (on sm_90 the clustered configurations join them: tested apart)
    monkeypatch.setattr(rules, "clusters_supported", lambda: False)
    N, K = 4096, 14336
    timer = stand_in_timer("mma:2x16")
    timed = timer.calls
    x = torch.zeros(64, K, dtype=F16)
    sz = torch.zeros(1, N, dtype=torch.int32)

    def pick(M, nsal=0):
        wst = torch.zeros(nsal, N, dtype=F16) if nsal else None
        return dispatch.tuned_route(x[:M], None, sz, wst, None, None, None, 4, 128, object(), timer)

    assert pick(16) == "mma:2x16"
    rule_triton = routes.route(16, N, K, 4)
    mmv16 = [routes.mmv_name(*c) for c in rules.mmv_configs(16, N, K)]
    mma16 = [routes.mma_name(*c) for c in rules.configs(16, N, K)]
    kw16 = [routes.mma_name(*c) for c in rules.mma_kw_configs(16, N, K)]
    assert kw16 == ["mma:1x8k2", "mma:2x8k2", "mma:4x8k2"]  # 4 and 8 warps a strip: 2 waves
    assert timed == [mmv16 + mma16 + kw16 + [rule_triton]]
    assert pick(9) == "mma:2x16" and len(timed) == 1  # same bucket: kept, not timed again
    assert routes.route_in_force(12, N, K, 4, 128, 0, True, device=None, dtype=F16) == "mma:2x16"
    rule_12 = routes.route(12, N, K, 4)
    assert routes.route_in_force(12, N, K, 4, 128, 0, False, device=None, dtype=F16) == rule_12

    timer.winner = rule_triton
    assert pick(16, nsal=128) == rule_triton and len(timed) == 2  # salient columns: own key
    timer.winner = routes.route(32, N, K, 4)  # the rule's Triton kernel at 32 rows
    assert pick(32) == timer.winner != rule_triton and len(timed) == 3  # bucket 17..32
    # outside TUNE_M the op takes the rule, whatever the nearest bucket kept: bucket 32 for
    # M > 32 (a CUDA configuration, as a real measurement may keep); one row and two rows have
    # buckets of their own, not 3-4's
    tuning._kept[tuning.key(None, N, K, 4, 128, 0, 32, F16, True)] = "mma:4x4"
    timer.winner = "mma:2x16"
    assert pick(4) == "mma:2x16" and len(timed) == 4
    mmv4 = [routes.mmv_name(*c) for c in rules.mmv_configs(4, N, K)]
    assert timed[3] == mmv4 + [routes.mma_name(*c) for c in rules.configs(4, N, K)] + [
        routes.route(4, N, K, 4)
    ]
    for M in (1, 2, 64, 128, 512):
        want = routes.route(M, N, K, 4, mma=True)
        assert not want.startswith("mma:")
        assert routes.route_in_force(M, N, K, 4, 128, 0, True, device=None, dtype=F16) == want
    # by rule, one row takes the GEMV, two the swapped kernel; two rows are timed at first
    # use with the GEMV (the rule without the CUDA kernels) and its other configurations
    # among the candidates
    assert routes.route(1, N, K, 4, mma=True) == "gemv"
    assert routes.route(2, N, K, 4, mma=True) == routes.mmv_name(*rules.mmv_choose(2, N, K))
    gemvs2 = ["gemv", *gemv_names(2, N, K, 128)]
    assert len(gemvs2) > 3 and all(n.startswith("gemv:") for n in gemvs2[1:])
    timer.winner = gemvs2[2]
    assert pick(2) == gemvs2[2] and len(timed) == 5
    mmv2 = [routes.mmv_name(*c) for c in rules.mmv_configs(2, N, K)]
    assert timed[4] == mmv2 + [routes.mma_name(*c) for c in rules.configs(2, N, K)] + gemvs2
    assert routes.route_in_force(2, N, K, 4, 128, 0, True, device=None, dtype=F16) == gemvs2[2]
    assert routes.route_in_force(1, N, K, 4, 128, 0, True, device=None, dtype=F16) == "gemv"
    assert routes.route_in_force(4, N, K, 4, 128, 0, True, device=None, dtype=F16) == "mma:2x16"
    timed[4:] = []
    timer.winner = "mma:2x16"

    def other(group=128, bits=4):  # the same shape and M with another group or width
        return dispatch.tuned_route(x[:16], None, sz, None, None, None, None, bits, group, 0, timer)

    other(group=64)
    other(bits=3)
    assert len(timed) == 6  # each its own measurement
    # bf16 calls (the kernels' bf16 builds) are measured and kept apart from fp16's
    bf16 = torch.bfloat16
    assert routes.route_in_force(16, N, K, 4, 128, 0, True, device=None, dtype=bf16) == (
        routes.route(16, N, K, 4, mma=True)
    )
    xb = torch.zeros(16, K, dtype=bf16)
    timer.winner = "mma:4x16"
    assert (
        dispatch.tuned_route(xb, None, sz, None, None, None, None, 4, 128, 0, timer) == "mma:4x16"
    )
    assert len(timed) == 7 and timed[6] == timed[0]  # the same candidates as fp16 at 16 rows
    assert pick(16) == "mma:2x16"  # fp16 keeps its own
    timed[4:] = []
    for M in (33, 64):  # outside TUNE_M: the rule (Triton), never timed
        assert pick(M) == routes.route(M, N, K, 4, mma=True)
    assert len(timed) == 4
    # one row: only the GEMV's configurations, in a bucket of its own
    gemvs1 = ["gemv", *gemv_names(1, N, K, 128)]
    timer.winner = gemvs1[-1]
    assert pick(1) == gemvs1[-1] and timed[4] == gemvs1
    assert routes.route_in_force(1, N, K, 4, 128, 0, True, device=None, dtype=F16) == gemvs1[-1]
    timed[4:] = []
    kept = {
        (r["m_bucket"], r["salient"], r["group"], r["bits"], r["dtype"]) for r in tuning.record()
    }
    fp16_kept = {(16, 0, 128, 4), (16, 128, 128, 4), (32, 0, 128, 4), (16, 0, 64, 4)} | {
        (4, 0, 128, 4),
        (2, 0, 128, 4),
        (1, 0, 128, 4),
        (16, 0, 128, 3),
    }
    assert kept == {(*k, "fp16") for k in fp16_kept} | {(16, 0, 128, 4, "bf16")}
    first = next(r for r in tuning.record() if r["salient"] == 0 and r["m_bucket"] == 16)
    assert first["kept"] == "mma:2x16" and set(first["seconds"]) == set(timed[0])
    monkeypatch.setenv("GIFT_QUANT_TUNE", "0")
    assert (
        pick(5) == routes.route(5, N, K, 4, mma=True) == routes.mmv_name(*rules.mmv_choose(5, N, K))
    )
    assert len(timed) == 4
    monkeypatch.delenv("GIFT_QUANT_TUNE")
    assert pick(5) == routes.route(5, N, K, 4, mma=True)  # kept: the same call, the same kernel
    assert len(timed) == 4


def test_cuda_kernel_configurations_fit_the_launch():
    """Every configuration the timing may pick is one the launch runs as named: WN divides the
    strips, the splits are the ones the launch's k-steps per split give, the staged x stays
    within 96 KB, the rule's configuration comes first, and 2- and 4-warp blocks are tried."""
    for N, K in [(4096, 4096), (4096, 14336), (8192, 28672), (12288, 4096), (960, 1536)]:
        for M in (3, 8, 16, 32, 64):
            cfgs = rules.configs(M, N, K)
            steps = K // 64
            assert cfgs[0] == rules.choose(M, N, K) and len(set(cfgs)) == len(cfgs)
            # the rule's name is the configuration that runs, and one the checks cover
            assert routes.route(M, N, K, 4, mma=True) in routes.candidates(M, mma=True, N=N, K=K)
            for wn, splits in cfgs:
                assert (N // 64) % wn == 0 and 1 <= splits <= steps
                per = -(-steps // splits)
                assert -(-steps // per) == splits
                rows = 16 if M <= 16 else 32 if M <= 32 else 64
                assert rows * per * 64 * 2 <= 96 * 1024
            if N // 64 % 4 == 0:
                assert {wn for wn, _ in cfgs} == {2, 4}


def test_mma_route_names_carry_the_configuration(monkeypatch):
    seen = []

    def fake(x2, p, bias, ws, cnt, wn=0, splits=0, cluster=1, kw=1, out=None):
        seen.append((wn, splits, cluster, kw))
        return out

    monkeypatch.setattr(native, "mixed_mma", fake)
    x = torch.zeros(4, 128, dtype=F16)
    sz = torch.zeros(2, 64, dtype=torch.int32)
    z = torch.zeros(1, dtype=torch.int32)
    cuda = layout.Packed(z, z, z, torch.zeros(1, 8, dtype=F16), z, 0, 4, 64, 128, 64)
    for name in ("mma:2x16", "mma:4x3", "mma:4x16c16", "mma:1x4k4c2"):
        dispatch.run_route(name, x, None, sz, None, None, None, None, 4, 64, cuda=cuda)
    assert seen == [(2, 16, 1, 1), (4, 3, 1, 1), (4, 16, 16, 1), (1, 4, 2, 4)]


def test_gemv_k_tile_at_one_row_follows_the_split_balance():
    """At M = 1 the GEMV takes the K tile (128 or 64) that shares the k-blocks more evenly over
    its splits: on the H200 an uneven share cost more than the smaller tile."""
    from gift_quant.kernels.triton.gemv import gemv_config

    # 5120^2: 40 blocks of 128 over 39 splits (one split does two); 80 blocks of 64 share better
    assert gemv_config(1, 5120, 5120, 4, 128)["BLOCK_K"] == 64
    # 4096^2: 32 blocks of 128 over 32 splits, even: the larger tile stays
    assert gemv_config(1, 4096, 4096, 4, 128)["BLOCK_K"] == 128
    # more rows: as before (64 at M = 2, 32 beyond), and a tile always divides K and the group
    assert [gemv_config(m, 5120, 5120, 4, 128)["BLOCK_K"] for m in (2, 3, 8)] == [64, 32, 32]
    for K, group in ((576, 64), (1536, 128), (4160, 64), (14336, 128)):
        bk = gemv_config(1, 4096, K, 4, group)["BLOCK_K"]
        assert K % bk == 0 and group % bk == 0


@pytest.mark.parametrize(
    ("M", "N", "K", "group"),
    [(1, 5120, 5120, 128), (2, 4096, 11008, 128), (1, 4096, 4096, 64), (1, 4096, 4160, 64)],
)
def test_gemv_configurations_timed_at_first_use_share_the_k_blocks_evenly(M, N, K, group):
    """The GEMV's configurations timed beside its rule at one and two rows: k-tiles that divide
    K and the group (128, 64, 32 at one row; 64, 32 at two), each split count dealing the
    k-blocks within 3% of evenly (counted from the kernel's own split bounds), never the
    rule's own configuration, each named once and launched as named."""
    from gift_quant.kernels.triton import gemv as g

    names = g.gemv_names(M, N, K, group)
    rule = g.gemv_config(M, N, K, 4, group)
    assert names and len(set(names)) == len(names)
    for name in names:
        cfg = g.split_config(M, N, 0, 132, *g.named_split(name))
        bk, s = cfg["BLOCK_K"], cfg["n_split"]
        assert bk in ((128, 64, 32) if M == 1 else (64, 32)) and K % bk == 0 and group % bk == 0
        n_kb = K // bk
        shares = [(i + 1) * n_kb // s - i * n_kb // s for i in range(s)]
        assert min(shares) >= 1 and max(shares) * s <= 1.03 * n_kb
        assert (bk, s) != (rule["BLOCK_K"], rule["n_split"]) and name == f"gemv:{bk}x{s}"
    assert g.gemv_names(3, N, K, group) == []


def test_a_named_gemv_configuration_is_the_one_launched(monkeypatch):
    """ "gemv:BKxS" launches the GEMV with k-tile BK and S splits (not the rule's), and the
    result is right: the launch grid and tile are read at the kernel itself."""
    from gift_quant.kernels.triton import gemv as g

    seen, real_kernel = [], g._gemv_kernel

    class Kernel:
        def __getitem__(self, grid):
            launch = real_kernel[grid]

            def call(*a, **k):
                seen.append((grid, k["BLOCK_K"], k["BLOCK_M"]))
                return launch(*a, **k)

            return call

    monkeypatch.setattr(g, "_gemv_kernel", Kernel())
    layer, w, b = make(256, 64, bits=4, group=128, salient=5, bias=True, seed=3)
    x = torch.randn(1, 256, device=DEV, dtype=F16)
    rule = g.gemv_config(1, 64, 256, 4, 128, 5)
    assert (rule["BLOCK_K"], rule["n_split"]) == (128, 2)
    assert "gemv:64x4" in gemv_names(1, 64, 256, 128)
    within_bound(dispatch.run_route("gemv:64x4", x, *_args(layer)), x, layer, w, b)
    assert seen[-1] == ((1, 4 + 1), 64, 1)  # one column block: 4 splits + 1 salient program
    within_bound(dispatch.run_route("gemv", x, *_args(layer)), x, layer, w, b)
    assert seen[-1] == ((1, 2 + 1), 128, 1)  # the rule's


def test_calls_with_and_without_the_cuda_layout_keep_their_own_choice(stand_in_timer):
    """A call without the CUDA kernels' layout (a training forward, a bf16 call under autograd)
    never takes a CUDA kernel kept for the same shape with it, nor the reverse: each times its
    own candidates."""
    N, K = 4096, 4096
    x, sz = torch.zeros(2, K, dtype=F16), torch.zeros(1, N, dtype=torch.int32)

    def pick(cuda, timer):
        return dispatch.tuned_route(x, None, sz, None, None, None, None, 4, 128, cuda, timer)

    with_layout = stand_in_timer(routes.mmv_name(*rules.mmv_configs(2, N, K)[0]))
    assert pick(object(), with_layout) == with_layout.winner
    without = stand_in_timer(gemv_names(2, N, K, 128)[0])
    assert pick(None, without) == without.winner  # timed anew, among the GEMV's
    assert without.calls == [["gemv", *gemv_names(2, N, K, 128)]]
    assert pick(object(), with_layout) == with_layout.winner and len(with_layout.calls) == 1
    for mma, want in ((True, with_layout.winner), (False, without.winner)):
        assert routes.route_in_force(2, N, K, 4, 128, 0, mma, device=None, dtype=F16) == want


def test_one_row_is_timed_among_the_gemv_configurations_without_the_cuda_kernels(
    stand_in_timer,
):
    """Without the CUDA kernels' layout (no CUDA compiler) the GEMV's configurations are still
    timed at one and two rows, and only they; more rows keep the rule untimed."""
    N, K = 4096, 4096
    timer = stand_in_timer(gemv_names(1, N, K, 128)[0])
    x, sz = torch.zeros(8, K, dtype=F16), torch.zeros(1, N, dtype=torch.int32)

    def pick(M):
        return dispatch.tuned_route(x[:M], None, sz, None, None, None, None, 4, 128, None, timer)

    assert pick(1) == timer.winner and timer.calls == [["gemv", *gemv_names(1, N, K, 128)]]
    timer.winner = "gemv"
    assert pick(2) == "gemv" and timer.calls[1] == ["gemv", *gemv_names(2, N, K, 128)]
    assert pick(4) == routes.route(4, N, K, 4) == "gemv" and len(timer.calls) == 2
    assert pick(16) == routes.route(16, N, K, 4) and len(timer.calls) == 2


def test_gemv_caps_its_registers_where_its_launch_exceeds_the_places(monkeypatch):
    """At M = 1 the GEMV caps its registers when its launch grid (K splits and salient
    programs per column block) has more than 23 programs per SM (the measured bound): the
    decision is checked against the grid the launch really used, on a GPU of 1 SM, where
    the salient programs tip a 16-program launch over 23."""
    from gift_quant.kernels.triton import gemv as g

    monkeypatch.setattr(g, "_sms", lambda device: 1)
    seen = []
    real_config, real_kernel = g.gemv_config, g._gemv_kernel

    def config(*a, **k):
        seen.append(real_config(*a, **k))
        return seen[-1]

    class Kernel:
        def __getitem__(self, grid):
            seen.append(grid)
            return real_kernel[grid]

    monkeypatch.setattr(g, "gemv_config", config)
    monkeypatch.setattr(g, "_gemv_kernel", Kernel())
    for nsal, capped in ((0, False), (120, False), (250, True)):  # 16, 20, 24 programs
        layer, w, b = make(1024, 256, bits=4, group=128, salient=nsal, seed=nsal)
        x = torch.randn(1, 1024, device=DEV, dtype=F16)
        within_bound(dispatch.run_route("gemv", x, *_args(layer)), x, layer, w, b)
        cfg, grid = seen[-2], seen[-1]
        assert (grid[0] * grid[1] > g.CAP_ABOVE_PROGRAMS_PER_SM) is capped
        assert cfg.get("maxnreg") == (g.WIDE_MAXNREG if capped else None)
    # on the H200 (132 SMs), 128 salient columns: the two widest benchmark shapes and the
    # sweep's shapes on either side of the bound (3,000 and 3,120 programs)
    wide = [(28672, 4096, True), (8192, 28672, True), (4096, 4096, False)]
    wide += [(25600, 4096, False), (26624, 4096, True)]
    for N, K, want in wide:
        assert ("maxnreg" in real_config(1, N, K, 4, 128, 128)) is want
    for N, K in ((12288, 4096), (4096, 14336), (13824, 5120), (5120, 13824)):
        assert "maxnreg" not in real_config(1, N, K, 4, 128, 128)
    assert "maxnreg" not in real_config(1, 22016, 4096, 4, 128, 250)  # 2,924: measured slower
    assert "maxnreg" not in real_config(2, 28672, 4096, 4, 128, 128)  # measured at M = 1 only


def _args(layer):
    p = ops.prepare(layer)
    return p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group


@gpu
@needs_cuda
@pytest.mark.parametrize("bits,dtype", [(2, BF16), (4, torch.float16)])
@pytest.mark.parametrize("name", sorted(mm.MM_CONFIGS))
def test_split_k_mm_is_right_in_every_call(name, bits, dtype):
    """Races show in some calls only, so each configuration makes 150 calls at 64 rows.
    Round 18: t128wr with registers capped at 168 gave a wrong output tile in about one call in
    six at 2 bits with bf16 (``tiles.settle``). Round 20: the split-K epilogue zeroed workspace
    elements before other threads had read them (zero outputs in about one call in 125 for t64
    at 4 bits, fp16; ``tiles.store_output``)."""
    layer, w, b = make(4096, 4096, bits=bits, group=128, salient=128, seed=bits, dtype=dtype)
    p = ops.prepare(layer)
    args = (p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
    for _ in range(150):
        x = torch.randn(64, 4096, device="cuda", dtype=dtype)
        within_bound(dispatch.run_route(f"mm:{name}", x, *args), x, layer, w, b)


def test_the_cuda_layout_is_built_for_fp16_calls_and_bf16_calls_without_autograd(monkeypatch):
    """``dequant_matmul`` builds the CUDA kernels' layout at fp16 calls and at bf16 calls
    without autograd (inference), never at bf16 calls with autograd (training keeps its
    memory), and hands the op the salient fragments in x's type."""
    layer, _, _ = make(128, 64, bits=4, group=32, salient=6, seed=4, dtype=BF16)
    built, seen = [], []
    z = torch.zeros(1, dtype=torch.int32)
    kept = layout.Packed(z, z, z, torch.zeros(1, 8, dtype=F16), z, 0, 4, 32, 128, 64)

    def cuda_layout(lay):
        built.append(lay)
        return kept

    monkeypatch.setattr(ops, "cuda_layout", cuda_layout)
    monkeypatch.setattr(ops, "mixed_matmul", lambda x, *a: seen.append(a[-1]) or x)
    x = torch.zeros(2, 128, dtype=BF16)
    ops.dequant_matmul(x, layer)  # autograd on: training
    assert built == [] and seen == [None]
    with torch.no_grad():
        ops.dequant_matmul(x, layer)
    assert built == [layer] and seen[-1].dtype == BF16
    ops.dequant_matmul(x.to(F16), layer)
    assert built == [layer, layer] and seen[-1] is kept.wsp
