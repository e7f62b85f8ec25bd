"""The CPU inference paths (kernels/cpu.py) against the float64 oracle and the torch reference.

Every path computes in fp32 on exact integer codes; its error against the float64 oracle is
bounded by a multiple of the reference's own fp32 error. The dequantize-every-call reference
(``Backend.TORCH``) stays the oracle's twin: the dense path and the CPU path's dequantize route
must equal it bitwise. Tiny shapes, a few ms each (the packed kernel is built once per machine).
"""

import pytest
import torch

from gift_quant.kernels import (
    Backend,
    base_matmul,
    cpu,
    cpu_native,
    dequant_matmul,
    resolve_backend,
)
from gift_quant.kernels.cpu import int4_unsupported, packed_unsupported, set_cpu_head
from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle, random_mixed_linear

CASES = [  # bits, group, sym, salient, bias
    (4, 32, True, 0, False),
    (4, 64, False, 8, True),
    (3, 32, False, 4, True),
    (3, 64, True, 8, False),
    (2, 32, False, 8, True),
    (2, 128, True, 0, True),
]
CPU_BACKENDS = [Backend.CPU, Backend.CPU_PACKED, Backend.CPU_DENSE, Backend.CPU_INT4]
# 1, 3 and 10 rows (4 + 4 + 2): the packed kernel under CPU, each of its row passes; 40: dequantize
ROWS = [(1,), (3,), (2, 5), (5, 8)]


def _check(out, ref, exact):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err, ref_err = kernel_error(out, ref, exact)
    assert err <= ERROR_FACTOR * max(ref_err, 1e-6), (err, ref_err)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("bits", "group", "sym", "k", "bias"), CASES)
def test_cpu_paths_match_the_oracle(backend, bits, group, sym, k, bias):
    layer = random_mixed_linear(
        256, 64, bits=bits, group_size=group, num_salient=k, bias=bias, sym=sym, seed=bits
    ).float()
    for i, rows in enumerate(ROWS):
        x = torch.randn(*rows, 256, generator=torch.Generator().manual_seed(i))
        ref = dequant_matmul(x, layer, Backend.TORCH)
        with torch.no_grad():
            out = dequant_matmul(x, layer, backend)
            base = base_matmul(x, layer, backend)
        _check(out, ref, oracle(x, layer))
        _check(base, base_matmul(x, layer, Backend.TORCH), oracle(x, layer, True))
        # the same products on the same weight: bitwise the reference
        if backend is Backend.CPU_DENSE or (backend is Backend.CPU and x.numel() > 32 * 256):
            assert torch.equal(out, ref)


def test_codes_at_the_zero_point_and_offset_inputs_keep_the_products_exact():
    """Codes within one of their group's zero-point and inputs far from zero mean: a kernel
    that took the zero-point off as z * sum(x) would subtract two large sums (up to 100x the
    reference's error here); each x * (q - z) must stay one product in the sum."""
    from gift_quant.quant.packing import pack_rows, unpack_cols, unpack_rows

    layer = random_mixed_linear(256, 64, bits=4, group_size=64, num_salient=4, seed=5).float()
    zeros = unpack_cols(layer.qzeros, 4)[layer.g_idx.long()]  # [K, N]
    near = zeros + torch.randint(-1, 2, zeros.shape, generator=torch.Generator().manual_seed(0))
    codes = near.clamp(0, 15).to(unpack_rows(layer.qweight, 4).dtype)
    with torch.no_grad():
        layer.qweight.copy_(pack_rows(codes, 4))
    for i, rows in enumerate([(1,), (3,), (2, 5)]):
        x = torch.randn(*rows, 256, generator=torch.Generator().manual_seed(i)) + 3
        with torch.no_grad():
            out = dequant_matmul(x, layer, Backend.CPU_PACKED)
        _check(out, dequant_matmul(x, layer, Backend.TORCH), oracle(x, layer))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_activations_are_computed_in_fp32(dtype):
    layer = random_mixed_linear(256, 64, bits=4, group_size=64, num_salient=8, bias=True, seed=5)
    layer = layer.to(dtype)
    x = torch.randn(3, 256).to(dtype)
    ref = dequant_matmul(x, layer, Backend.TORCH)
    with torch.no_grad():
        for backend in (Backend.CPU, Backend.CPU_PACKED):
            _check(dequant_matmul(x, layer, backend), ref, oracle(x, layer))
        big = torch.randn(40, 256).to(dtype)
        assert torch.equal(dequant_matmul(big, layer, Backend.CPU), layer(big))
        assert torch.equal(
            dequant_matmul(big, layer, Backend.CPU), dequant_matmul(big, layer, Backend.TORCH)
        )


def test_packed_kernel_dequantizes_bitwise_like_the_reference():
    from gift_quant.kernels.reference import dequantize_weight

    for bits in (2, 3, 4):
        layer = random_mixed_linear(192, 64, bits=bits, group_size=32, num_salient=3, seed=bits)
        wt = dequantize_weight(
            layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, torch.float32
        )
        assert torch.equal(cpu_native.dequantize(cpu_native.pack(layer)), wt)


def test_auto_picks_the_cpu_path_for_cpu_inference_and_the_reference_with_grad():
    x = torch.zeros(2, 8)
    with torch.no_grad():
        assert resolve_backend(Backend.AUTO, x) is Backend.CPU
    assert resolve_backend(Backend.AUTO, x) is Backend.TORCH
    assert resolve_backend("cpu_int4", x) is Backend.CPU_INT4
    assert resolve_backend("cpu_packed", x) is Backend.CPU_PACKED


def test_grad_flows_through_the_cpu_path_and_the_packed_kernel_refuses_it():
    layer = random_mixed_linear(128, 32, bits=4, group_size=32, num_salient=4, seed=6).float()
    x = torch.randn(1, 128, requires_grad=True)
    dequant_matmul(x, layer, Backend.CPU).sum().backward()  # the dequantize route, in torch
    expected = layer.dequantize().sum(0)
    assert torch.allclose(x.grad, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="is for inference"):
        dequant_matmul(x, layer, Backend.CPU_PACKED)


def test_the_cache_is_built_once_and_rebuilt_when_a_tensor_changes():
    layer = random_mixed_linear(
        128, 64, bits=4, group_size=32, num_salient=4, bias=True, seed=3
    ).float()
    x = torch.randn(3, 128)
    with torch.no_grad():
        layer(x)
        first = layer._cpu_cache["packed"][1]
        layer(x)
        assert layer._cpu_cache["packed"][1] is first  # reused, not rebuilt per call
        for name in ("scales", "salient_weight", "bias"):  # copied in place: must be noticed
            before = layer._cpu_cache["packed"][1]
            getattr(layer, name).mul_(2)
            y = layer(x)
            assert layer._cpu_cache["packed"][1] is not before, name
            assert torch.allclose(y.double(), oracle(x, layer), rtol=1e-4, atol=1e-4), name


def test_a_layer_with_built_caches_copies_and_pickles():
    import copy
    import io

    layer = random_mixed_linear(128, 64, bits=3, group_size=32, num_salient=4, seed=7).float()
    x = torch.randn(2, 128)
    with torch.no_grad():
        y = layer(x)
        dequant_matmul(x, layer, Backend.CPU_DENSE)
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        for twin in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):
            assert not twin._cpu_cache  # rebuilt from the twin's own tensors
            assert torch.equal(twin(x), y)


def test_layers_the_packed_kernel_cannot_compute_take_the_dense_path(monkeypatch):
    eight = random_mixed_linear(128, 64, bits=8, group_size=32, seed=4).float()
    assert "8-bit" in packed_unsupported(eight)
    act_order = random_mixed_linear(128, 64, bits=4, group_size=32, seed=4).float()
    act_order.g_idx.copy_(act_order.g_idx.flip(0))
    assert "act-order" in packed_unsupported(act_order)
    x = torch.randn(1, 128)
    with torch.no_grad():
        for layer in (eight, act_order):
            out = dequant_matmul(x, layer, Backend.CPU)
            assert torch.equal(out, dequant_matmul(x, layer, Backend.TORCH))
            assert "dense" in layer._cpu_cache
            with pytest.raises(ValueError, match="cannot run this layer"):
                dequant_matmul(x, layer, Backend.CPU_PACKED)
    monkeypatch.setitem(cpu_native._state, "lib", None)  # as on a machine without a C compiler
    layer = random_mixed_linear(128, 64, bits=4, group_size=32, seed=4).float()
    assert "could not be built" in packed_unsupported(layer)
    with torch.no_grad():
        out = dequant_matmul(x, layer, Backend.CPU)
    assert torch.equal(out, dequant_matmul(x, layer, Backend.TORCH))
    assert "dense" in layer._cpu_cache


def test_the_parallel_split_computes_the_same_bits(monkeypatch):
    layer = random_mixed_linear(256, 128, bits=4, group_size=64, num_salient=8, seed=8).float()
    x = torch.randn(6, 256)
    with torch.no_grad():
        one = dequant_matmul(x, layer, Backend.CPU_PACKED)
        threads = torch.get_num_threads()
        monkeypatch.setattr(cpu_native, "PARALLEL_MIN_WORK", 0)  # split even this small call
        torch.set_num_threads(2)
        try:
            two = dequant_matmul(x, layer, Backend.CPU_PACKED)
            wt = cpu_native.dequantize(cpu._packed(layer))
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each output block is one thread's, summed in the same order
    from gift_quant.kernels.reference import dequantize_weight

    ref = dequantize_weight(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, wt.dtype)
    assert torch.equal(wt, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_cpu_head_reads_an_exact_fp16_copy(dtype):
    head = torch.nn.Linear(67, 48, bias=False)  # K not a multiple of the kernel's 4 sums
    with torch.no_grad():
        head.weight.copy_(head.weight.half().float())  # fp16 values, as an export stores them
    head = head.to(dtype)
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head
    assert set_cpu_head(model) and isinstance(head, cpu.CpuHead)
    with torch.no_grad():
        for shape in [(1, 1), (3,), (2, 3)]:  # 1, 3 and 6 (4 + 2) rows: each row pass
            x = torch.randn(*shape, 67).to(dtype)
            ref = torch.nn.functional.linear(x, head.weight)
            got = head(x)
            assert cpu._HALF[head.weight][1] is not None
            _check(got, ref, x.double() @ head.weight.double().t())
        big = torch.randn(40, 67).to(dtype)  # prefill: the plain matmul
        assert torch.equal(head(big), torch.nn.functional.linear(big, head.weight))
    with torch.no_grad():
        head.weight.add_(1e-3)  # no longer fp16 values (fp32 case): nn.Linear again
        got = head(x)
    if dtype is torch.float32:
        assert cpu._HALF[head.weight][1] is None
        assert torch.equal(got, torch.nn.functional.linear(x, head.weight))
    assert set_cpu_head(model, enabled=False) and type(head) is torch.nn.Linear


@pytest.mark.parametrize(("bits", "group", "sym", "k", "bias"), [CASES[1], CASES[2]])
def test_torch_compile_keeps_the_kernels_in_one_graph(bits, group, sym, k, bias):
    # the kernels are ctypes calls, which Dynamo cannot trace: compiled, they are ops the graph
    # keeps (fullgraph=True fails on any break), computing what the eager layers compute
    layer = random_mixed_linear(
        256, 64, bits=bits, group_size=group, num_salient=k, bias=bias, sym=sym, seed=bits
    ).float()
    head = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        head.weight.copy_(head.weight.half().float())
    head.__class__ = cpu.CpuHead
    model = torch.nn.Sequential(layer, head)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randn(1, 256)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
        layer.scales.mul_(2)  # copied in place: the compiled op sees it, as the eager layer does
        head.weight.mul_(2)
        got = compiled(x)
        assert torch.equal(got, model(x))
        want = oracle(x, layer) @ head.weight.double().t()
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)
        layer.qzeros = layer.qzeros.flip(0)  # a buffer replaced by a new tensor: seen too
        assert torch.equal(compiled(x), model(x))
        xs = torch.randn(2, 20, 256)  # 40 rows: the dequantize-then-matmul route, 3-D
        assert torch.equal(compiled(xs), model(xs))


def test_the_ops_forms_are_released_and_go_with_the_layer():
    import gc

    from gift_quant.kernels import release_inference_forms

    layer = random_mixed_linear(128, 64, bits=4, group_size=32, num_salient=4, seed=5).float()
    x = torch.randn(1, 128)
    before = len(cpu._OP_CACHES)
    with torch.no_grad():
        assert torch.equal(cpu.compiled_matmul(x, layer), layer(x))  # the op, called eagerly
        assert layer.qweight in cpu._OP_CACHES
        release_inference_forms(layer)  # as GIFT-SW does before training
        assert layer.qweight not in cpu._OP_CACHES
        cpu.compiled_matmul(x, layer)
    del layer
    gc.collect()
    assert len(cpu._OP_CACHES) == before  # no reference to the layer's tensors kept


def test_int4_refuses_layouts_it_cannot_compute_exactly():
    layer = random_mixed_linear(128, 64, bits=8, group_size=32, seed=4).float()
    assert "8-bit" in int4_unsupported(layer)
    with pytest.raises(ValueError, match="cannot run this layer: 8-bit"):
        dequant_matmul(torch.zeros(1, 128), layer, Backend.CPU_INT4)
    act_order = random_mixed_linear(128, 64, bits=4, group_size=32, seed=4)
    act_order.g_idx.copy_(act_order.g_idx.flip(0))
    assert "act-order" in int4_unsupported(act_order)
    assert "group size 16" in int4_unsupported(random_mixed_linear(128, 64, bits=4, group_size=16))
