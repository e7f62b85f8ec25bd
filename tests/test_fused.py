"""Sibling layers fused into one wider layer (gift_quant/fused.py): the same logits as the layers
one by one on every claimed family, each member's output its own product whatever the call
order, under torch.compile too; mismatched layers left alone; a fused model is not exported."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, build_tiny
from torch import nn

from gift_quant.fused import FusedMember, concat, fuse_siblings, is_fused
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import decoder_blocks, set_module
from gift_quant.quant import QUANTIZERS
from gift_quant.recipe import QuantConfig
from gift_quant.testing import random_mixed_linear


def quantized(family: str, bits=lambda name: 4) -> nn.Module:
    """A tiny model of ``family`` in fp32 with every Linear of its blocks RTN-quantized (group
    32, asymmetric) keeping 4 salient columns chosen per layer by column norm, so that siblings
    have different salient sets; ``bits(name)`` per layer."""
    model = build_tiny(family).float()
    prefix, blocks = decoder_blocks(model)
    rtn = QUANTIZERS.get("rtn")
    gen = torch.Generator().manual_seed(1)
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear or not name.startswith(prefix):
            continue
        W = mod.weight.detach().float()
        W = W + 0.05 * torch.randn(W.shape, generator=gen)  # siblings' salient sets differ
        idx = torch.sort(torch.topk(W.norm(dim=0), 4).indices).values
        cfg = QuantConfig(method="rtn", bits=bits(name), group_size=32, sym=False, mse_clip=False)
        layer = MixedLinear.from_quantized(rtn(W, None, idx, cfg), mod.bias, dtype=torch.float32)
        set_module(model, name, layer)
    for m in model.modules():
        if isinstance(m, MixedLinear):
            m.backend = "torch"
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_model_gives_the_same_logits(family: str) -> None:
    model = quantized(family)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    want = logits(model, ids)
    groups = fuse_siblings(model)
    if family in ("phi3", "gpt_neox"):  # their q/k/v (and gate/up) are one layer already
        assert groups == []
        return
    names = {n.rpartition(".")[2] for g in groups for n in g}
    if family in ("llama", "qwen2", "qwen3", "mistral", "gemma3", "opt"):
        assert {"q_proj", "k_proj", "v_proj"} <= names
    if family in ("llama", "qwen2", "qwen3", "mistral", "gemma3"):
        assert {"gate_proj", "up_proj"} <= names
    assert all(len(g) >= 2 for g in groups)
    got = logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    n_layers = len(decoder_blocks(model)[1])
    assert len(groups) % n_layers == 0  # the same groups in every block


def test_members_take_their_own_product_in_any_order() -> None:
    """Each member's output is its own layer's product: called in any order, one member twice
    before the others (it computes again), a new input, an input mutated in place."""
    layers = [
        random_mixed_linear(64, n, bits=3, group_size=32, num_salient=k, bias=True, seed=s)
        for s, (n, k) in enumerate([(64, 4), (32, 0), (96, 6)])
    ]
    for m in layers:
        m.backend = "torch"
    parent = nn.Module()
    for i, m in enumerate(layers):
        parent.add_module(f"p{i}", m)
    x = torch.randn(5, 64, dtype=torch.float16)
    want = [m(x).float() for m in layers]

    class Calls(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = parent

        def forward(self, x):
            return [getattr(self.block, f"p{i}")(x) for i in range(3)]

    model = Calls()
    assert fuse_siblings(model, probe={"x": x}) == [["block.p0", "block.p1", "block.p2"]]
    members = [getattr(parent, f"p{i}") for i in range(3)]
    assert all(isinstance(m, FusedMember) for m in members)
    for order in ([2, 0, 1], [1, 1, 0, 2], [0, 2]):
        for i in order:
            torch.testing.assert_close(members[i](x).float(), want[i], rtol=2e-3, atol=2e-3)
    x2 = torch.randn(5, 64, dtype=torch.float16)
    torch.testing.assert_close(members[1](x2).float(), layers[1](x2).float())
    members[0](x2)
    x2.mul_(2)  # mutated after member 0 computed the product: member 2 must not reuse it
    torch.testing.assert_close(members[2](x2).float(), layers[2](x2).float())
    out = members[0](x)
    assert out.shape == (5, 64)


def test_concat_is_exact() -> None:
    """The concatenated layer's dense weight is the members' stacked (salient columns in place:
    the union, each member's own values, zeros elsewhere), bias included."""
    layers = [
        random_mixed_linear(128, n, bits=b, group_size=64, num_salient=k, bias=True, seed=s)
        for s, (n, k, b) in enumerate([(64, 8, 3), (32, 0, 3), (96, 5, 3)])
    ]
    fused = concat(layers)
    want = torch.cat([m.dequantize() for m in layers])
    torch.testing.assert_close(fused.dequantize(), want, rtol=0, atol=0)
    torch.testing.assert_close(fused.bias, torch.cat([m.bias for m in layers]))
    assert fused.num_salient <= sum(m.num_salient for m in layers)


def test_mismatched_siblings_stay_apart_and_fused_models_are_not_exported(tmp_path) -> None:
    from gift_quant.io.export import save_quantized

    model = quantized("llama", bits=lambda name: 3 if name.endswith("k_proj") else 4)
    groups = fuse_siblings(model)
    names = {n.rpartition(".")[2] for g in groups for n in g}
    assert "k_proj" not in names and {"gate_proj", "up_proj"} <= names
    assert is_fused(model)
    with pytest.raises(ValueError, match="fused"):
        save_quantized(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    from gift_quant.io.gptq_lora import save_gptq_lora

    with pytest.raises(ValueError, match="fused"):
        save_gptq_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_fused_model_under_torch_compile() -> None:
    """Dynamo traces the hand-out of slices (the same logits as eager, one graph per shape:
    no recompilation from one call to the next)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    model = quantized("llama")
    ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(0))
    want = logits(model, ids)
    fuse_siblings(model)
    torch._dynamo.reset()
    counts = CompileCounter()
    fwd = torch.compile(model.forward, backend=counts)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(fwd(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert counts.frame_count >= 1
    frames = counts.frame_count
    with torch.no_grad():
        fwd(input_ids=ids)
    assert counts.frame_count == frames


def test_fused_model_on_the_cpu_kernel_and_plain_linears() -> None:
    """The CPU kernel (backend auto on the CPU) gives the fused model the logits of the layers
    one by one; plain Linears (``linear=True``, an unquantized model) too."""
    model = quantized("qwen3")
    for m in model.modules():
        if isinstance(m, MixedLinear):
            m.backend = "auto"
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(2))
    want = logits(model, ids)
    assert fuse_siblings(model)
    torch.testing.assert_close(logits(model, ids), want, rtol=1e-4, atol=1e-4)
    dense = build_tiny("llama").float()
    want = logits(dense, ids)
    groups = fuse_siblings(dense, linear=True)
    assert {n.rpartition(".")[2] for n in groups[0]} == {"q_proj", "k_proj", "v_proj"}
    assert isinstance(dense.lm_head, nn.Linear)  # no sibling
    torch.testing.assert_close(logits(dense, ids), want, rtol=1e-5, atol=1e-5)


def test_one_product_per_input_and_inference_mode() -> None:
    """The fused layer runs once per input for all members (not once per member), and works on
    inference tensors (which keep no version counter)."""
    model = quantized("llama")
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(3))
    want = logits(model, ids)
    groups = fuse_siblings(model)
    runs = []
    for m in model.modules():
        if isinstance(m, FusedMember) and m.index == 0:
            m.group.fused.register_forward_hook(lambda mod, a, out: runs.append(mod))
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(runs) == len(groups)  # one product per group and forward pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_layers_on_the_gpu_kernels_at_every_route(dtype) -> None:
    """On the GPU, at M that take the GEMV, the swapped and tensor-core kernels, Triton mm and
    dequantize + cuBLAS: each member's slice of the fused product is its own layer's product
    (the members' salient sets differ, so the fused layer's union holds other members' codes)."""
    layers = [
        random_mixed_linear(
            1024, n, bits=4, group_size=128, num_salient=64, seed=s, dtype=dtype, device="cuda"
        )
        for s, n in enumerate([1024, 256, 256])
    ]
    fused = concat(layers)
    for M in (1, 9, 16, 64, 200, 600):
        x = torch.randn(M, 1024, device="cuda", dtype=dtype)
        y = fused(x).float()
        lo = 0
        for m in layers:
            want = m(x).float()
            got = y[:, lo : lo + m.out_features]
            lo += m.out_features
            err = float((got - want).norm() / want.norm())
            assert err < 1e-2, (M, dtype, err)
