"""GIFT-SW's CPU training weight (``kernels/cpu_noise.c``) against Triton's generator and the
GPU rebuild: the draws, the weight, the torch twin without noise, the refusals. Triton runs in
its interpreter without a GPU (tests/conftest.py), compiled on a GPU machine."""

import copy

import pytest
import torch
import triton
import triton.language as tl

from gift_quant.kernels import cpu_native
from gift_quant.kernels.triton import ops
from gift_quant.mixed_linear import MixedLinear
from gift_quant.testing import random_quantized
from gift_quant.train.gift_linear import GiftLinear

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F16, BF16 = torch.float16, torch.bfloat16


def _layer(K, N, *, bits, group, salient, seed):
    qw, _ = random_quantized(K, N, bits, group, salient, False, seed, False)
    return MixedLinear.from_quantized(qw, None, dtype=F16).to(DEV)


@triton.jit
def _draws(out_ptr, seed, offset, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """GIFT-SW's unit noise as the GPU rebuild draws it (kernels/triton/mm.py)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if KIND == 1:
        r = tl.randn(seed, offset + o) * 0.5
    else:
        r = tl.rand(seed, offset + o) - 0.5
    tl.store(out_ptr + o, r, mask=o < n)


needs_cpu_kernels = pytest.mark.skipif(
    cpu_native.library() is None, reason="the CPU kernels could not be built here"
)


@needs_cpu_kernels
@pytest.mark.parametrize("kind", ["normal", "uniform"])
@pytest.mark.parametrize("seed", [0, 9, 2**33 + 5])
def test_cpu_noise_is_tritons_generator(kind, seed):
    """The CPU kernel's noise (``cpu_noise.c``: Philox4x32-10, Box-Muller with its own log and
    cos) against Triton's own ``tl.randn`` / ``tl.rand`` at the same offsets (here run by
    Triton's interpreter, or on the GPU where there is one): the same draws up to the last bits
    of the log and cosine."""
    n, offset = 3000, 1000
    ref = torch.empty(n, device=DEV)
    _draws[(triton.cdiv(n, 1024),)](
        ref, seed, offset, n, KIND=1 if kind == "normal" else 2, BLOCK=1024
    )
    ours = cpu_native.noise_draws(seed, offset, n, kind)
    torch.testing.assert_close(ours, ref.cpu(), rtol=0, atol=1e-6)
    std = 0.5 if kind == "normal" else 12**-0.5
    assert abs(float(ours.std()) / std - 1) < 0.05  # a wrong transform would not be close


@needs_cpu_kernels
@pytest.mark.parametrize("noise", ["normal", "uniform", "none"])
def test_cpu_training_weight_is_the_gpu_kernels(noise):
    """GIFT-SW's CPU rebuild (one pass: grid, noise, bf16 rounding; the salient rows set after)
    against the GPU kernel's (``ops.noisy_weight_t``, in the interpreter or on the GPU) for
    the same layer and seed: the same bf16 weight but for a rare rounding tie (the noise
    agrees to the last bits of the log and cosine)."""
    layer = _layer(256, 128, bits=3, group=64, salient=6, seed=5)
    g = GiftLinear.from_mixed(copy.deepcopy(layer).cpu(), noise, bits=3).train()
    seed = None if noise == "none" else 11
    ws = g.salient_weight.detach()
    ours = g._weight_t_native(BF16, noise, seed, ws)
    assert ours is not None  # the CPU kernel served it (no silent fallback to the torch twin)
    delta = None if g.delta is None else g.delta.to(DEV)
    kernel = ops.noisy_weight_t(layer, ws.t().to(DEV), noise, delta, seed or 0, BF16).cpu()
    assert (ours != kernel).float().mean() < 1e-3
    torch.testing.assert_close(ours.float(), kernel.float(), rtol=2**-7, atol=0)
    if noise != "none":  # and the noise is there
        assert not torch.equal(ours, g.weight_t(BF16, None, ws))


@needs_cpu_kernels
def test_cpu_rebuild_without_noise_is_the_torch_twins():
    """Without noise the CPU kernel's weight is the torch twin's bit for bit, in fp32 (exact)
    and in bf16 (the scale rounded, then the product), and with noise it does not depend on
    the number of threads."""
    layer = _layer(192, 96, bits=4, group=32, salient=4, seed=8)
    g = GiftLinear.from_mixed(layer.cpu(), "normal", bits=4).train()  # (moves it: a CPU test)
    ws = g.salient_weight.detach()
    for dtype in (torch.float32, BF16):
        ours = g._weight_t_native(dtype, "none", None, ws)
        assert ours is not None and torch.equal(ours, g._weight_t_torch(dtype, "none", None, ws))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = g.weight_t(BF16, 5, ws)
        torch.set_num_threads(2)
        assert torch.equal(g.weight_t(BF16, 5, ws), one)
    finally:
        torch.set_num_threads(threads)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("noise", ["normal", "uniform"])
def test_cpu_training_weight_is_grid_plus_tritons_draws_at_k_n_plus_n(noise, dtype):
    """Any width (here 160 output columns: not a multiple of the kernel's 64-counter blocks),
    fp32 or bf16: the CPU kernel's weight is the torch twin's noise-free grid plus delta[n]
    times Triton's own draw at offset k * N + n (``_draws``), added with one rounding, and the
    salient rows are the trainable columns."""
    K, N, seed = 96, 160, 12
    layer = _layer(K, N, bits=4, group=32, salient=3, seed=6)
    g = GiftLinear.from_mixed(copy.deepcopy(layer).cpu(), noise, bits=4).train()
    ws = torch.randn_like(g.salient_weight)
    ours = g._weight_t_native(dtype, noise, seed, ws)
    assert ours is not None
    r = torch.empty(K * N, device=DEV)
    _draws[(triton.cdiv(K * N, 1024),)](
        r, seed, 0, K * N, KIND=1 if noise == "normal" else 2, BLOCK=1024
    )
    grid = g._weight_t_torch(dtype, "none", None, ws).double()
    want = (grid + r.cpu().view(K, N).double() * g.delta.double()[None, :]).to(dtype)
    sal = g.salient_idx.long()
    want[sal] = ws.t().to(dtype)
    assert torch.equal(ours[sal], want[sal])
    if dtype == torch.float32:  # the draws agree to ~5e-7, times delta
        torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6 * float(g.delta.max()))
    else:  # and in bf16 the same value but for a rare rounding tie
        assert (ours != want).float().mean() < 1e-3
        torch.testing.assert_close(ours.float(), want.float(), rtol=2**-7, atol=0)


@needs_cpu_kernels
def test_cpu_training_weight_refuses_a_wrong_noise_scale():
    codes = torch.zeros(64, 64, dtype=torch.uint8)
    zeros, scales = torch.zeros(2, 64, dtype=torch.int32), torch.ones(2, 64)
    with pytest.raises(ValueError, match=r"needs a per-column scale delta of shape \(64,\)"):
        cpu_native.noisy_weight_t(codes, zeros, scales, 32, torch.ones(1), "normal", 0, BF16)
    with pytest.raises(ValueError, match="outside the 64-bit range"):
        cpu_native.noisy_weight_t(codes, zeros, scales, 32, torch.ones(64), "normal", 2**64, BF16)
