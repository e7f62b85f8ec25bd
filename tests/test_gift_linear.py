"""GIFT-SW training form: frozen grid, noise statistics, gradients, exact export."""

import pytest
import torch

from gift_quant.mixed_linear import MixedLinear
from gift_quant.noise import noise_step, sample_noise
from gift_quant.quant import QUANTIZERS
from gift_quant.recipe import QuantConfig
from gift_quant.train.gift_linear import GiftLinear


def mixed_layer(gen, bits=3, K=128, N=64, k=8):
    W = torch.randn(N, K, generator=gen)
    idx = torch.sort(torch.randperm(K, generator=gen)[:k]).values
    qw = QUANTIZERS.get("rtn")(W, None, idx, QuantConfig(bits=bits, group_size=32))
    return MixedLinear.from_quantized(qw, torch.randn(N, generator=gen), dtype=torch.float32)


def test_noise_step_is_the_paper_grid(gen):
    W = torch.randn(16, 256, generator=gen)
    idx = torch.tensor([0, 5])
    W[:, idx] = 100.0  # salient columns must not inflate the row scale
    delta = noise_step(W, idx, bits=4)
    rest = W.clone()
    rest[:, idx] = 0
    amax = rest.abs().amax(1)
    assert torch.all(delta <= amax / 7 + 1e-6) and torch.all(delta >= 0.2 * amax / 7)
    # the chosen clip beats plain absmax in squared error

    def err(d):
        return ((torch.clamp(torch.round(rest / d[:, None]), -8, 7) * d[:, None] - rest) ** 2).sum()

    assert err(delta) <= err(amax / 7)


@pytest.mark.parametrize("budget", [None, 1 << 26, 700, 64])
def test_noise_step_chunks_equal_a_sequential_search(gen, budget):
    """Every chunking (candidates stacked, rows sliced) picks what a plain loop over the
    candidates picks for each row: the first clip with the least squared error."""
    W = torch.randn(7, 48, generator=gen) * 0.05
    idx = torch.tensor([3])
    got = noise_step(W, idx, bits=3, budget=budget)
    rest = W.clone()
    rest[:, idx] = 0
    for i in range(W.shape[0]):
        amax = float(rest[i].abs().max())
        best, best_d = float("inf"), None
        for c in range(80):
            d = torch.tensor((1 - c / 100) * amax / 3, dtype=torch.float32)
            e = float(((torch.clamp(torch.round(rest[i] / d), -4, 3) * d - rest[i]) ** 2).sum())
            if e < best:
                best, best_d = e, float(d)
        assert float(got[i]) == pytest.approx(best_d, rel=1e-6)


@pytest.mark.parametrize("kind, var", [("normal", 0.25), ("uniform", 1 / 12)])
def test_noise_statistics_and_determinism(kind, var):
    scale = torch.tensor([1.0, 2.0])
    a = sample_noise(
        (2, 200_000), scale[:, None], kind, seed=7, device=torch.device("cpu"), dtype=torch.float32
    )
    b = sample_noise(
        (2, 200_000), scale[:, None], kind, seed=7, device=torch.device("cpu"), dtype=torch.float32
    )
    assert torch.equal(a, b)
    assert torch.allclose(a.var(1), var * scale**2, rtol=0.02)


def test_only_salient_columns_train_and_grid_stays_exact(gen):
    layer = mixed_layer(gen)
    frozen = {n: t.clone() for n, t in layer.state_dict().items() if n != "salient_weight"}
    start = layer.salient_weight.clone()
    g = GiftLinear.from_mixed(layer, "normal", bits=4)
    assert [n for n, p in g.named_parameters() if p.requires_grad] == ["salient_weight"]
    opt = torch.optim.SGD(g.parameters(), lr=0.1)
    g.train()
    for step in range(3):
        g.noise_seed = step
        g(torch.randn(4, 128, generator=gen)).square().mean().backward()
        opt.step()
    mixed = g.to_mixed()
    for name, t in frozen.items():
        assert torch.equal(getattr(mixed, name), t), name
    assert mixed.salient_weight.shape == start.shape
    assert (mixed.salient_weight != start).float().mean() > 0.5, "the salient columns trained"


def test_noise_only_on_non_salient_columns_in_training_only(gen):
    layer = mixed_layer(gen)
    g = GiftLinear.from_mixed(layer, "normal", bits=4)
    x = torch.zeros(1, 128)
    x[0, g.salient_idx[0]] = 1.0  # only a salient input: noise must not reach the output
    g.train()
    g.noise_seed = 1
    clean = g.eval()(x)
    g.train()
    assert torch.allclose(g(x), clean, atol=1e-6)
    x2 = torch.randn(1, 128, generator=gen)
    g.noise_seed = 2
    noisy = g(x2)
    assert not torch.allclose(noisy, g.eval()(x2))


def test_gradients_match_autograd_through_an_explicit_noisy_weight(gen):
    layer = mixed_layer(gen)
    g = GiftLinear.from_mixed(layer, "uniform", bits=4).double()
    g.train()
    g.noise_seed = 11
    x = torch.randn(3, 128, generator=gen, dtype=torch.float64, requires_grad=True)
    y = g(x)
    (gx, gw) = torch.autograd.grad(y.square().sum(), [x, g.salient_weight])
    wt = g.weight_t(torch.float64, 11)  # the same noise, rebuilt from the seed
    x2 = x.detach().clone().requires_grad_(True)
    w2 = g.salient_weight.detach().clone().requires_grad_(True)
    y2 = x2 @ wt + x2[:, g.salient_idx.long()] @ w2.t() + g.bias
    (gx2, gw2) = torch.autograd.grad(y2.square().sum(), [x2, w2])
    assert torch.allclose(y, y2) and torch.allclose(gx, gx2) and torch.allclose(gw, gw2)


def test_keeping_the_training_weight_for_backward_changes_nothing(gen):
    """``keep_weight`` (the trainer's choice on the CPU) reuses the forward pass's noisy W^T in
    the backward pass instead of rebuilding it from the seed: the same outputs and gradients,
    bit for bit, and nothing held once the backward pass has run."""
    layer = mixed_layer(gen)
    x = torch.randn(2, 5, 128, generator=gen)
    results = []
    for keep in (False, True):
        g = GiftLinear.from_mixed(layer, "normal", bits=4)
        g.train()
        g.noise_seed, g.keep_weight = 7, keep
        xi = x.clone().requires_grad_(True)
        y = g(xi)
        node = y.grad_fn.next_functions[0][0]  # _GiftMatmul's ctx
        graph_holds = node.wt is not None
        y.square().sum().backward(retain_graph=True)
        results.append((y.detach(), xi.grad, g.salient_weight.grad, graph_holds, node.wt))
    (y0, gx0, gw0, held0, _), (y1, gx1, gw1, held1, after) = results
    assert not held0 and held1 and after is None  # released by the backward pass
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1) and torch.equal(gw0, gw1)


def test_the_trainer_keeps_training_weights_only_on_the_cpu_and_where_they_fit(monkeypatch, gen):
    from gift_quant.train import loop

    gift = [GiftLinear.from_mixed(mixed_layer(gen), "normal", bits=4)]  # 64 x 128
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    held = 64 * 128 * 2  # bf16
    cpu, bf16 = torch.device("cpu"), torch.bfloat16

    def keep(available, device=cpu, ranks=1):
        monkeypatch.setattr(loop, "_available_bytes", lambda: available)
        return loop._keep_weights(gift, model, device, bf16, ranks)

    assert keep(4 * held) and not keep(4 * held - 1) and not keep(None)
    assert keep(8 * held, ranks=2) and not keep(8 * held - 1, ranks=2)  # ranks share the host
    assert not keep(1 << 40, device=torch.device("cuda"))
    model[0].gradient_checkpointing = True  # as transformers' gradient_checkpointing_enable sets
    assert not keep(1 << 40)


def test_eval_computes_exactly_what_the_export_computes(gen):
    layer = mixed_layer(gen)
    g = GiftLinear.from_mixed(layer, "normal", bits=4)
    with torch.no_grad():
        g.salient_weight.add_(torch.randn_like(g.salient_weight) * 1e-3)  # not fp16-exact
    x = torch.randn(5, 128, generator=gen)
    before = g.eval()(x)
    assert torch.equal(before, g.to_mixed()(x))


def test_pre_mode_dense_base(gen):
    lin = torch.nn.Linear(128, 64)
    idx = torch.tensor([1, 2, 3])
    g = GiftLinear.from_dense(lin, idx, "normal", bits=3)
    x = torch.randn(2, 128, generator=gen)
    assert torch.allclose(g.eval()(x), lin(x), atol=1e-3)  # W_S rounded to fp16 in eval
    out = g.to_linear()
    assert torch.equal(out.weight[:, 4:], lin.weight[:, 4:])


def test_noise_choices_are_the_registered_kinds(monkeypatch):
    """train.noise accepts what NOISES holds (and "none"); sample_noise draws from it."""
    from gift_quant.noise import NOISES
    from gift_quant.recipe import RecipeError, TrainConfig

    assert NOISES.names() == ["normal", "uniform"]
    with pytest.raises(RecipeError, match="train.noise"):
        TrainConfig(noise="laplace")
    monkeypatch.setitem(NOISES._entries, "laplace", lambda shape, *_: torch.ones(shape))
    assert TrainConfig(noise="laplace").noise == "laplace"
    scale = torch.tensor([1.0, 3.0])
    got = sample_noise((2, 4), scale[:, None], "laplace", 0, torch.device("cpu"), torch.float32)
    assert torch.equal(got, scale[:, None].expand(2, 4))


def test_training_drops_the_forms_an_evaluation_cached(gen):
    """An evaluation before GIFT-SW (inference: no autograd) leaves cached forms on each
    quantized layer -- on the CPU a dense or packed form, on a GPU the CUDA kernels' copy of
    the codes; wrapping the layer for training drops them, so training does not hold them."""
    layer = mixed_layer(gen)
    x = torch.randn(3, 128, generator=gen)
    with torch.no_grad():
        want = layer(x)  # CPU inference: builds and caches a form
    assert layer.__dict__.get("_cpu_cache")
    stand_in = object()
    try:
        from gift_quant.kernels.triton import ops
    except ImportError:
        ops = None
    if ops is not None and ops.prepare(layer) is not None:  # as a GPU evaluation leaves it
        ops.prepare(layer).cuda = stand_in
    GiftLinear.from_mixed(layer, "normal", bits=4)
    assert not layer.__dict__.get("_cpu_cache")
    if ops is not None and ops.prepare(layer) is not None:
        assert ops.prepare(layer).cuda is None and not ops.prepare(layer).cuda_checked
    with torch.no_grad():
        assert torch.equal(layer(x), want)  # built again where inference asks for it
