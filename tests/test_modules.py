import torch

from gift_quant.kernels import Backend, dequant_matmul, resolve_backend
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import cast_params
from gift_quant.quant import QUANTIZERS
from gift_quant.recipe import QuantConfig


def random_layer(bits, gen, K=128, N=96, k=8, bias=True, sym=True, group_size=32):
    W = torch.randn(N, K, generator=gen)
    idx = torch.sort(torch.randperm(K, generator=gen)[:k]).values
    qw = QUANTIZERS.get("rtn")(W, None, idx, QuantConfig(bits=bits, group_size=group_size, sym=sym))
    b = torch.randn(N, generator=gen) if bias else None
    return qw, MixedLinear.from_quantized(qw, b, dtype=torch.float16), b


def test_forward_equals_dense_dequantized_weight_in_float64(gen):
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            qw, layer, b = random_layer(bits, gen, sym=sym)
            x = torch.randn(5, 7, 128, generator=gen, dtype=torch.float64)
            W = qw.dequantize().double()
            W[:, qw.salient_idx] = qw.salient_weight.half().double()  # stored as fp16
            expect = x @ W.t() + b.half().double()
            got = layer.to(torch.float64)(x)
            assert got.dtype == torch.float64
            assert torch.allclose(got, expect, rtol=1e-12, atol=1e-10), (bits, sym)
            assert torch.allclose(layer.dequantize(torch.float64), W, atol=0)


def test_cast_keeps_the_stored_format(gen):
    _, layer, _ = random_layer(4, gen)
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.salient_weight.dtype == torch.float16
    assert layer.qweight.dtype == torch.int32 and layer.bias.dtype == torch.bfloat16


def test_bias_is_a_frozen_parameter_that_cast_params_casts(gen):
    """The bias follows parameter-wise casts (as a Linear's does); the stored format stays."""
    _, layer, _ = random_layer(4, gen)
    assert isinstance(layer.bias, torch.nn.Parameter) and not layer.bias.requires_grad
    cast_params(layer, torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16 and not layer.bias.requires_grad
    assert layer.scales.dtype == torch.float16 and layer.salient_weight.dtype == torch.float16


def test_storage_bits_counts_codes_scales_zeros_and_salient_columns(gen):
    _, layer, _ = random_layer(3, gen, K=128, N=96, k=8)
    assert layer.storage_bits() == 128 * 96 * 3 + 4 * 96 * (16 + 3) + 8 * (16 * 96 + 32)


def test_cpu_tensors_resolve_to_the_torch_reference(gen):
    _, layer, _ = random_layer(4, gen)
    x = torch.randn(2, 128, generator=gen)
    assert resolve_backend(Backend.AUTO, x) is Backend.TORCH
    assert torch.equal(dequant_matmul(x, layer.float(), "torch"), layer.float()(x))
