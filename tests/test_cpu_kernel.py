"""The CPU inference paths (kernels/cpu.py) against the float64 oracle and the torch reference.

Both paths compute in fp32 on exact integer codes; their error against the float64 oracle is
bounded by a multiple of the reference's own fp32 error, tiny shapes, a few ms each.
"""

import pytest
import torch

from gift_quant.kernels import Backend, base_matmul, dequant_matmul, resolve_backend
from gift_quant.kernels.cpu import int4_unsupported
from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle, random_mixed_linear

CASES = [  # bits, group, sym, salient, bias
    (4, 32, True, 0, False),
    (4, 64, False, 8, True),
    (3, 32, False, 4, True),
    (3, 64, True, 8, False),
    (2, 32, False, 8, True),
    (2, 128, True, 0, True),
]


@pytest.mark.parametrize("backend", [Backend.CPU, Backend.CPU_INT4])
@pytest.mark.parametrize(("bits", "group", "sym", "k", "bias"), CASES)
def test_cpu_paths_match_the_oracle(backend, bits, group, sym, k, bias):
    layer = random_mixed_linear(
        256, 64, bits=bits, group_size=group, num_salient=k, bias=bias, sym=sym, seed=bits
    ).float()
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(1))
    exact = oracle(x, layer)
    ref = dequant_matmul(x, layer, Backend.TORCH)
    with torch.no_grad():
        out = dequant_matmul(x, layer, backend)
    assert out.shape == ref.shape and out.dtype == x.dtype
    if backend is Backend.CPU:  # the same products on the same weight: bitwise the reference
        assert torch.equal(out, ref)
    err, ref_err = kernel_error(out, ref, exact)
    assert err <= ERROR_FACTOR * max(ref_err, 1e-6), (err, ref_err)
    base = base_matmul(x, layer, backend)
    err, ref_err = kernel_error(base, base_matmul(x, layer, Backend.TORCH), oracle(x, layer, True))
    assert err <= ERROR_FACTOR * max(ref_err, 1e-6), (err, ref_err)


def test_auto_picks_the_cached_path_for_cpu_inference_and_the_reference_with_grad():
    x = torch.zeros(2, 8)
    with torch.no_grad():
        assert resolve_backend(Backend.AUTO, x) is Backend.CPU
    assert resolve_backend(Backend.AUTO, x) is Backend.TORCH
    assert resolve_backend("cpu_int4", x) is Backend.CPU_INT4


def test_the_cache_is_built_once_and_rebuilt_when_a_buffer_changes():
    layer = random_mixed_linear(128, 64, bits=4, group_size=32, num_salient=4, seed=3).float()
    x = torch.randn(3, 128)
    with torch.no_grad():
        layer(x)
        first = layer._cpu_cache["dense"][1]
        layer(x)
        assert layer._cpu_cache["dense"][1] is first  # reused, not rebuilt per call
        layer.scales.mul_(2)  # new weights copied in place: the cache must notice
        y = layer(x)
    exact = oracle(x, layer)
    assert layer._cpu_cache["dense"][1] is not first
    assert torch.allclose(y.double(), exact, rtol=1e-4, atol=1e-4)


def test_int4_refuses_layouts_it_cannot_compute_exactly():
    layer = random_mixed_linear(128, 64, bits=8, group_size=32, seed=4).float()
    assert "8-bit" in int4_unsupported(layer)
    with pytest.raises(ValueError, match="cannot run this layer: 8-bit"):
        dequant_matmul(torch.zeros(1, 128), layer, Backend.CPU_INT4)
    act_order = random_mixed_linear(128, 64, bits=4, group_size=32, seed=4)
    act_order.g_idx.copy_(act_order.g_idx.flip(0))
    assert "act-order" in int4_unsupported(act_order)
    assert "group size 16" in int4_unsupported(random_mixed_linear(128, 64, bits=4, group_size=16))
