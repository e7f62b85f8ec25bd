"""Interop with the GPTQ ecosystem: gptqmodel reads our tensors bit for bit, and the gptq+lora
engine view runs under transformers + optimum + gptqmodel + peft. Needs the [gptq] and
[baselines] extras; skipped cleanly without them (CI installs them)."""

import os

import pytest
import torch
from conftest import tiny_recipe

pytest.importorskip("gptqmodel", reason="needs the [gptq] extra: pip install -e .[gptq]")
pytest.importorskip("optimum", reason="needs the [gptq] extra")
pytest.importorskip("peft", reason="needs the [baselines] extra")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

from gift_quant.io.export import save_quantized  # noqa: E402
from gift_quant.io.gptq_lora import ADAPTER_DIR, save_gptq_lora  # noqa: E402
from gift_quant.io.load import load_quantized  # noqa: E402
from gift_quant.mixed_linear import MixedLinear  # noqa: E402
from gift_quant.modeling import cast_params, load_model  # noqa: E402
from gift_quant.quantize import quantize_model  # noqa: E402

pytestmark = pytest.mark.gptq


@pytest.fixture(scope="module")
def engine_dirs(tiny_model_dirs, tmp_path_factory):
    made = {}

    def get(bits, sym=True):
        if (bits, sym) not in made:
            recipe = tiny_recipe(
                tiny_model_dirs("llama"), f"quant.bits={bits}", f"quant.sym={str(sym).lower()}"
            )
            model, tok = load_model(recipe.model)
            quantize_model(model, tok, recipe, progress=False)
            root = tmp_path_factory.mktemp(f"w{bits}{'s' if sym else 'a'}")
            save_quantized(model, root / "mixed", tokenizer=tok)
            save_gptq_lora(model, root / "engine", tokenizer=tok)
            made[(bits, sym)] = (model, root)
        return made[(bits, sym)]

    return get


@pytest.mark.parametrize("bits, sym", [(2, True), (3, True), (4, True), (8, True), (4, False)])
def test_gptqmodel_dequantizes_our_tensors_bit_for_bit(engine_dirs, bits, sym):
    from gptqmodel import BACKEND, GPTQModel

    model, root = engine_dirs(bits, sym)
    theirs = GPTQModel.load(
        str(root / "engine"), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16
    )
    checked = 0
    for name, ours in model.named_modules():
        if not isinstance(ours, MixedLinear):
            continue
        layer = theirs.model.get_submodule(name)
        w_theirs = layer.dequantize_weight().to(torch.float16)  # [K, N]
        base = ours.dequantize(torch.float16).t().clone()
        base[ours.salient_idx.long()] = 0  # the GPTQ part alone: salient codes dequantize to 0
        assert torch.equal(w_theirs, base), name
        checked += 1
    assert checked == 14


def test_gptq_lora_view_under_transformers_optimum_gptqmodel_peft(engine_dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, root = engine_dirs(4)
    ids = torch.arange(1, 60).unsqueeze(0)
    hf = AutoModelForCausalLM.from_pretrained(
        root / "engine", dtype=torch.float16, device_map="cpu"
    )
    hf = PeftModel.from_pretrained(hf, root / "engine" / ADAPTER_DIR)
    with torch.no_grad():
        got = hf(ids).logits.double()
        ours16 = load_quantized(root / "mixed", dtype=torch.float16)(ids).logits.double()
        exact = cast_params(load_quantized(root / "mixed"), torch.float64)(ids).logits
        no_lora = hf.get_base_model()
        with hf.disable_adapter():
            base_only = no_lora(ids).logits.double()
    err_theirs = (got - exact).abs().max()
    err_ours = (ours16 - exact).abs().max()
    effect = (base_only - exact).abs().max()
    # fp16 tolerance: a few fp16 ulps of the logit scale on top of our own fp16 path's error
    # (the stock stack rounds in other places: its aten int4 kernel and the LoRA branch);
    # and the adapter is what brings it there
    print(
        f"max|logit| {float(exact.abs().max()):.4f}  err stock {float(err_theirs):.2e}  "
        f"err ours fp16 {float(err_ours):.2e}  err without adapter {float(effect):.2e}"
    )
    assert err_theirs <= 2 * err_ours + 5e-3 * exact.abs().max()
    assert effect > 10 * err_theirs
