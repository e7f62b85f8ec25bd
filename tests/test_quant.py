"""Grid, RTN and GPTQ: invariants and beats-baseline checks, no golden numbers."""

import dataclasses

import pytest
import torch

from gift_quant.quant import QUANTIZERS
from gift_quant.quant.grid import Grid, dequantize, fit_params, quantize
from gift_quant.recipe import QuantConfig

rtn, gptq = QUANTIZERS.get("rtn"), QUANTIZERS.get("gptq")


def correlated_inputs(n_tokens, K, gen):
    """Activations with correlated features and a few outlier channels, like LLM inputs."""
    base = torch.randn(n_tokens, K // 4, generator=gen)
    mix = torch.randn(K // 4, K, generator=gen)
    x = base @ mix + 0.3 * torch.randn(n_tokens, K, generator=gen)
    x[:, :3] *= 20
    return x


def output_error(W, Wq, X):
    return float(((X @ (W - Wq).t()) ** 2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_grid_params(bits, sym, gen):
    w = torch.randn(16, 4, 32, generator=gen)
    g = Grid(bits=bits, sym=sym)
    s, z = fit_params(w, g)
    assert torch.equal(s, s.half().float()), "scales must be fp16-exact"
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= g.maxq
    if sym:
        assert torch.all(z == 2 ** (bits - 1))
    q = quantize(w, s.unsqueeze(-1), z.unsqueeze(-1), g.maxq)
    assert q.min() >= 0 and q.max() <= g.maxq


def test_mse_clip_never_worse_than_absmax(gen):
    w = torch.randn(64, 8, 64, generator=gen) ** 3  # heavy tails: clipping pays
    for bits in (2, 3, 4):
        errs = []
        for mse in (False, True):
            g = Grid(bits=bits, mse_clip=mse)
            s, z = fit_params(w, g)
            q = dequantize(
                quantize(w, s[..., None], z[..., None], g.maxq), s[..., None], z[..., None]
            )
            errs.append(float(((q - w).abs() ** g.clip_norm).sum()))
        assert errs[1] < errs[0]


def test_masked_columns_do_not_widen_the_range(gen):
    w = torch.randn(8, 1, 32, generator=gen)
    w[:, 0, 5] = 1000.0
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[0, 5] = False
    s_masked, _ = fit_params(w, Grid(bits=4, mse_clip=False), mask)
    s_full, _ = fit_params(w, Grid(bits=4, mse_clip=False))
    assert torch.all(s_masked < s_full / 50)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_salient_columns_sit_at_the_zero_point(method, bits, gen):
    W = torch.randn(64, 128, generator=gen)
    H = torch.eye(128) + 0.1
    idx = torch.tensor([3, 40, 77, 100])
    cfg = QuantConfig(method=method, bits=bits, group_size=32)
    qw = QUANTIZERS.get(method)(W, H, idx, cfg)
    zeros_of_col = qw.zeros[:, qw.g_idx.long()]
    assert torch.equal(qw.codes[:, idx].float(), zeros_of_col[:, idx])
    deq = qw.dequantize()
    assert torch.equal(deq[:, idx], qw.salient_weight)
    if method == "rtn":
        assert torch.equal(qw.salient_weight, W[:, idx])


def test_gptq_equals_rtn_when_hessian_is_identity(gen):
    # no cross-column correlation => nothing to compensate
    W = torch.randn(32, 128, generator=gen)
    idx = torch.tensor([7, 64])
    # (act-order needs static groups here: lazily formed act groups are other column sets)
    for order in ("natural", "act", "gar"):
        cfg = QuantConfig(bits=3, group_size=32, order=order, static_groups=order == "act")
        a = gptq(W, torch.eye(128), idx, cfg)
        b = rtn(W, None, idx, cfg)
        assert torch.equal(a.codes, b.codes), order
        assert torch.equal(a.scales, b.scales), order


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("order", ["natural", "act", "gar"])
def test_gptq_beats_rtn_on_correlated_inputs(bits, order, gen):
    K = 256
    W = torch.randn(96, K, generator=gen)
    X = correlated_inputs(2048, K, gen)
    H = X.t() @ X / X.shape[0]
    cfg = QuantConfig(bits=bits, group_size=64, order=order)
    none = torch.zeros(0, dtype=torch.long)
    e_gptq = output_error(W, gptq(W, H, none, cfg).dequantize(), X)
    e_rtn = output_error(W, rtn(W, None, none, cfg).dequantize(), X)
    assert e_gptq < 0.8 * e_rtn


def test_gptq_compensates_into_salient_columns(gen):
    K = 256
    W = torch.randn(64, K, generator=gen)
    X = correlated_inputs(2048, K, gen)
    H = X.t() @ X / X.shape[0]
    idx = torch.arange(0, K, 16)
    cfg = QuantConfig(bits=3, group_size=64)
    qw = gptq(W, H, idx, cfg)
    assert not torch.allclose(qw.salient_weight, W[:, idx]), "salient columns must be updated"
    frozen = dataclasses.replace(qw, salient_weight=W[:, idx].clone())
    assert output_error(W, qw.dequantize(), X) < output_error(W, frozen.dequantize(), X)


def test_salient_columns_reduce_output_error(gen):
    K = 256
    W = torch.randn(64, K, generator=gen)
    X = correlated_inputs(2048, K, gen)
    H = X.t() @ X / X.shape[0]
    act = X.abs().amax(0)
    errs = []
    for k in (0, 8, 32):
        idx = torch.sort(torch.topk(act, k).indices).values
        errs.append(
            output_error(W, gptq(W, H, idx, QuantConfig(bits=3, group_size=64)).dequantize(), X)
        )
    assert errs[2] < errs[1] < errs[0]


def test_act_order_without_static_groups_permutes_g_idx(gen):
    K = 128
    W = torch.randn(32, K, generator=gen)
    X = correlated_inputs(1024, K, gen)
    H = X.t() @ X / X.shape[0]
    none = torch.zeros(0, dtype=torch.long)
    lazy = gptq(W, H, none, QuantConfig(bits=4, group_size=32, order="act"))
    static = gptq(W, H, none, QuantConfig(bits=4, group_size=32, order="act", static_groups=True))
    trivial = torch.arange(K) // 32
    assert not torch.equal(lazy.g_idx.long(), trivial)
    assert torch.equal(static.g_idx.long(), trivial)
    assert torch.bincount(lazy.g_idx.long()).tolist() == [32] * 4
    for qw in (lazy, static):
        assert output_error(W, qw.dequantize(), X) < output_error(
            W, rtn(W, None, none, QuantConfig(bits=4, group_size=32)).dequantize(), X
        )


def test_dead_columns_and_bad_shapes(gen):
    W = torch.randn(32, 64, generator=gen)
    H = torch.eye(64)
    H[10, 10] = 0  # an input that is always zero
    qw = gptq(W, H, torch.zeros(0, dtype=torch.long), QuantConfig(bits=4, group_size=32))
    assert qw.dequantize()[:, 10].abs().max() == 0
    with pytest.raises(ValueError, match="does not divide the layer width 64"):
        rtn(W, None, torch.zeros(0, dtype=torch.long), QuantConfig(bits=4, group_size=48))
    with pytest.raises(ValueError, match="needs the layer's Hessian"):
        gptq(W, None, torch.zeros(0, dtype=torch.long), QuantConfig())


def test_stacked_rows_equal_separate_gptq_runs(gen):
    # q/k/v share one Hessian: GPTQ of the stacked rows must equal three separate runs
    K = 128
    X = correlated_inputs(1024, K, gen)
    H = X.t() @ X / X.shape[0]
    Ws = [torch.randn(n, K, generator=gen) for n in (64, 32, 32)]
    none = torch.zeros(0, dtype=torch.long)
    cfg = QuantConfig(bits=3, group_size=32)
    stacked = gptq(torch.cat(Ws), H, none, cfg)
    start = 0
    for W in Ws:
        alone = gptq(W, H, none, cfg)
        part = stacked.rows(start, start + W.shape[0])
        assert torch.equal(part.codes, alone.codes) and torch.equal(part.scales, alone.scales)
        assert abs(part.loss - alone.loss) <= 1e-4 * max(alone.loss, 1.0)
        start += W.shape[0]


def test_quant_method_choices_are_the_registered_quantizers(monkeypatch):
    """quant.method accepts exactly what QUANTIZERS holds: no second list to keep in step."""
    from gift_quant.recipe import RecipeError

    assert QUANTIZERS.names() == ["gptq", "rtn"]
    with pytest.raises(RecipeError, match=r"quant.method must be one of \['gptq', 'rtn'\]"):
        QuantConfig(method="awq")
    monkeypatch.setitem(QUANTIZERS._entries, "awq", rtn)
    assert QuantConfig(method="awq").method == "awq"
