"""LoRA and DoRA baselines on a frozen quantized tiny model: matched parameter counts, DoRA's
formula on a packed base, training, and the saved adapter loading back to the same logits."""

import json

import pytest
import torch
from conftest import tiny_recipe

from gift_quant.io.export import save_quantized
from gift_quant.io.load import load_quantized
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import load_model
from gift_quant.quantize import quantize_model

pytest.importorskip("peft")

from gift_quant.train.lora import (  # noqa: E402
    adapter_params,
    attach_lora,
    load_lora,
    matched_lora_rank,
)

IDS = torch.arange(1, 40).unsqueeze(0)


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dirs, tmp_path_factory):
    recipe = tiny_recipe(tiny_model_dirs("llama"), "calib.true_sequential=false")
    model, tok = load_model(recipe.model)
    quantize_model(model, tok, recipe, progress=False)
    out = tmp_path_factory.mktemp("lora") / "quantized"
    save_quantized(model, out, tokenizer=tok, recipe=recipe)
    return out


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_matched_rank_is_the_closest_parameter_count(quantized_dir, dora):
    base = load_quantized(quantized_dir)
    layers = [m for m in base.modules() if isinstance(m, MixedLinear)]
    salient = sum(m.salient_weight.numel() for m in layers)
    rank = matched_lora_rank(base, dora)
    counts = {}
    for r in (rank - 1, rank, rank + 1):
        if r >= 1:
            counts[r] = trainable(attach_lora(load_quantized(quantized_dir), r, dora=dora)[0])
    # the count PEFT actually trains is nearest to the salient columns at the matched rank
    gap = {r: abs(n - salient) for r, n in counts.items()}
    assert gap[rank] == min(gap.values()), (counts, salient)
    per_rank = sum(m.in_features + m.out_features for m in layers)
    magnitudes = sum(m.out_features for m in layers) if dora else 0
    assert counts[rank] == rank * per_rank + magnitudes
    # the disk check's count (from shapes alone) is the one PEFT trains, at every rank
    shapes = [(m.num_salient, m.out_features, m.in_features) for m in layers]
    assert all(adapter_params(shapes, r, dora) == n for r, n in counts.items())


def test_dora_on_the_packed_base_computes_dora_and_round_trips(quantized_dir, tmp_path):
    """m * (W + s B A) / ||W + s B A||_row applied to x, with W the dense weight of the packed
    layer (salient columns included), checked after B and m have moved off their init; the
    saved adapter loads back to the same logits."""
    from peft.tuners.lora.layer import LoraLayer

    model, _ = attach_lora(load_quantized(quantized_dir, dtype=torch.float32), 2, dora=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.lora_B["default"].weight.normal_(0, 0.1, generator=gen)
                mag = m.lora_magnitude_vector["default"].weight
                mag.mul_(1 + 0.1 * torch.randn(mag.shape, generator=gen))
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))
    base: MixedLinear = layer.get_base_layer()
    W = base.dequantize(torch.float64)
    A = layer.lora_A["default"].weight.double()
    B = layer.lora_B["default"].weight.double()
    s = layer.scaling["default"]
    mag = layer.lora_magnitude_vector["default"].weight
    V = W + s * B @ A
    expected_w = mag.double()[:, None] * V / V.norm(dim=1, keepdim=True)
    x = torch.randn(3, 5, base.in_features, generator=gen)
    expected = x.double() @ expected_w.T
    if base.bias is not None:
        expected = expected + base.bias.double()
    layer.eval()
    with torch.no_grad():
        got = layer(x).double()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), name

    model.eval().save_pretrained(tmp_path / "adapter")
    loaded = load_lora(load_quantized(quantized_dir, dtype=torch.float32), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(IDS).logits, model(IDS).logits)


def test_dora_trains_and_what_is_saved_is_trained(
    quantized_dir, tiny_tokenizer, wiki_train_text, tmp_path
):
    from gift_quant.config import TrainConfig
    from gift_quant.train.loop import train

    text = tmp_path / "train.txt"  # a slice of the wiki training text: quick to tokenize
    text.write_text(wiki_train_text[:40_000])
    steps = 16
    cfg = TrainConfig(
        method="dora",
        data=str(text),
        steps=steps,
        batch_size=4,
        grad_accum=1,
        seq_len=32,
        lr=2e-2,
        save_every=0,
    )
    model, _ = attach_lora(load_quantized(quantized_dir), dora=True)
    report = train(model, tiny_tokenizer, cfg, tmp_path / "train", fingerprint={}, progress=False)
    assert report.trainable_params == trainable(model)
    rows = (tmp_path / "train/metrics.jsonl").read_text().splitlines()
    losses = [json.loads(x)["loss"] for x in rows]
    assert len(losses) == steps
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses

    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["use_dora"]
    loaded = load_lora(load_quantized(quantized_dir), tmp_path / "adapter")
    fresh, _ = attach_lora(load_quantized(quantized_dir), dora=True)
    mags = {n: p for n, p in loaded.named_parameters() if "lora_magnitude_vector" in n}
    init = {n: p for n, p in fresh.named_parameters() if "lora_magnitude_vector" in n}
    assert mags.keys() == init.keys() and len(mags) == 14
    assert all(not torch.equal(mags[n], init[n]) for n in mags), "every magnitude trained"
    with torch.no_grad():
        assert torch.equal(loaded.eval()(IDS).logits, model.eval()(IDS).logits)
