import math

import pytest
import torch

from gift_quant.calibration import LayerStats
from gift_quant.quant.grid import Grid
from gift_quant.recipe import QuantConfig, SaliencyConfig
from gift_quant.saliency import column_scores, salient_budget, select_salient


def stats_of(x, hessian=False):
    s = LayerStats.empty(x.shape[-1], hessian)
    for chunk in x.split(100):
        s.add(chunk)
    return s


def test_stats_accumulate_exactly(gen):
    x = torch.randn(1000, 16, generator=gen)
    s = stats_of(x, hessian=True)
    assert torch.allclose(s.act_max, x.abs().amax(0))
    assert torch.allclose(s.act_norm(1), x.abs().sum(0), rtol=1e-5)
    assert torch.allclose(s.act_norm(2), x.norm(dim=0), rtol=1e-5)
    assert torch.allclose(s.hessian, x.t() @ x / 1000, rtol=1e-4, atol=1e-6)
    assert s.num_tokens == 1000


def test_metrics_find_planted_columns(gen):
    W = torch.randn(64, 128, generator=gen) * 0.02
    x = torch.randn(512, 128, generator=gen)
    x[:, 17] *= 50  # activation outlier
    W[0, 90] = 1.0  # a weight the clipped grid cannot represent
    stats = stats_of(x)
    grid = Grid(bits=3)
    quik = column_scores(W, stats, SaliencyConfig(metric="quik").norms, grid, 32)
    gift = column_scores(W, stats, SaliencyConfig(metric="gift").norms, grid, 32)
    assert int(quik.argmax()) == 17
    assert {17, 90} <= set(select_salient(gift, 2).tolist())
    assert select_salient(gift, 0).numel() == 0


def test_gift_d_term_uses_the_clipped_grid(gen):
    # With MSE clipping, |D| varies across columns: the D-term carries information.
    W = torch.randn(64, 128, generator=gen) ** 3
    stats = stats_of(torch.ones(4, 128))
    flat_x = column_scores(W, stats, (math.inf, math.inf, 1.0), Grid(bits=3), 32)
    assert flat_x.std() / flat_x.mean() > 0.2


def test_budget_count_fraction_ratio_avg_bits():
    q = QuantConfig(bits=3, group_size=64)
    assert salient_budget("a.q_proj", 576, 576, SaliencyConfig(), q) == 128
    assert salient_budget("a.q_proj", 576, 576, SaliencyConfig(fraction=0.03), q) == 17
    assert salient_budget("a.q_proj", 576, 576, SaliencyConfig(fraction=0.0), q) == 0
    cfg = SaliencyConfig(count=64, layer_ratios={r"mlp\.(gate|up)": 0.375})
    assert salient_budget("x.mlp.up_proj", 576, 1536, cfg, q) == 24
    assert salient_budget("x.self_attn.q_proj", 576, 576, cfg, q) == 64
    k = salient_budget("x", 576, 576, SaliencyConfig(avg_bits=3.8), q)
    base = 576 * 576 * 3 + 9 * 576 * 19
    assert base + k * (16 * 576 + 32) <= 3.8 * 576 * 576 < base + (k + 1) * (16 * 576 + 32)


def test_budget_errors_name_the_fix():
    q = QuantConfig(bits=4, group_size=32)
    with pytest.raises(ValueError, match="does not fit a layer 64 columns wide"):
        salient_budget("l", 64, 64, SaliencyConfig(count=64), q)
    with pytest.raises(ValueError, match="below the .* bits/weight the grid alone stores"):
        salient_budget("l", 64, 64, SaliencyConfig(avg_bits=4.1), q)


def test_salient_plan_is_made_once_per_layer_and_used(tiny_model_dirs, monkeypatch):
    """quantize_model asks for each layer's budget once (the salient plan), and every layer
    keeps exactly the planned number of columns."""
    from conftest import tiny_recipe

    import gift_quant.quantize as quantize
    from gift_quant.mixed_linear import MixedLinear
    from gift_quant.modeling import load_model

    asked = []

    def counting_budget(name, *args):
        asked.append(name)
        return salient_budget(name, *args)

    monkeypatch.setattr(quantize, "salient_budget", counting_budget)
    recipe = tiny_recipe(
        tiny_model_dirs("llama"), "quant.method=rtn", "calib.true_sequential=false"
    )
    model, tok = load_model(recipe.model)
    report = quantize.quantize_model(model, tok, recipe, progress=False)
    names = [r.name for r in report.layers]
    assert sorted(asked) == sorted(names) and len(set(names)) == len(names) > 0
    mixed = [m for m in model.modules() if isinstance(m, MixedLinear)]
    assert len(mixed) == len(names) and {m.num_salient for m in mixed} == {4}
