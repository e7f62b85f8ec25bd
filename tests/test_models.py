"""End to end on tiny random models of every claimed family: quantize, export, load back."""

import pytest
import torch
from conftest import FAMILIES, stored_tensor_bytes, tiny_recipe

from gift_quant.data import eval_windows, load_documents, tokenize_documents
from gift_quant.evaluate import perplexity
from gift_quant.io.export import export_bytes, save_quantized
from gift_quant.io.load import load_quantized
from gift_quant.mixed_linear import MixedLinear
from gift_quant.modeling import DTYPES, cast_params, decoder_blocks, find_targets, load_model
from gift_quant.quantize import check_targets, quantize_model
from gift_quant.validation import meta_model


def logits32(model, ids):
    """float32 logits; the model's parameters get their dtype back."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        out = cast_params(model, torch.float32)(ids).logits
    cast_params(model, dtype)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_structural_discovery(family, tiny_model_dirs):
    model, _ = load_model(tiny_recipe(tiny_model_dirs(family)).model)
    name, blocks = decoder_blocks(model)
    assert len(blocks) == 2
    targets = find_targets(blocks[0], f"{name}.0", (".*",), ())
    assert len(targets) >= 4
    assert not any("embed" in n or "lm_head" in n for n in targets)


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_export_load_round_trip(family, tiny_model_dirs, tmp_path):
    recipe = tiny_recipe(tiny_model_dirs(family))
    model, tok = load_model(recipe.model)
    ids = torch.arange(40).unsqueeze(0)
    fp_logits = logits32(model, ids)
    report = quantize_model(model, tok, recipe, progress=False)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in decoder_blocks(model)[1].modules())
    assert n_linear == 0, "every Linear of every block is replaced"
    mixed = [m for m in model.modules() if isinstance(m, MixedLinear)]
    assert len(mixed) == len(report.layers) and all(m.num_salient == 4 for m in mixed)
    assert all(r.rel_error is not None and 0 <= r.rel_error < 1 for r in report.layers)

    ref = logits32(model, ids)
    assert torch.isfinite(ref).all()
    assert not torch.equal(ref, fp_logits)
    save_quantized(model, tmp_path / "export", tokenizer=tok, recipe=recipe)
    # the size the run's disk check plans from the model's config alone is what was written
    meta = meta_model(recipe.model)
    plan = check_targets(meta, recipe.model, recipe.saliency, recipe.quant)[3]
    planned = export_bytes(meta, plan, recipe.quant, DTYPES[recipe.model.dtype])
    assert planned == stored_tensor_bytes(tmp_path / "export")
    loaded = load_quantized(tmp_path / "export", dtype=torch.float32)
    got = loaded(ids).logits
    assert torch.equal(got, ref), "the export computes exactly what the in-memory model does"

    windows = eval_windows(tokenize_documents(tok, load_documents("wiki-heldout")), 64, 512)
    ppl = perplexity(loaded, windows, progress=False)
    assert ppl["tokens"] == 8 * 63 and ppl["perplexity"] > 1


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
def test_blocks_are_calibrated_in_copies(tiny_model_dirs, device):
    """Each block is calibrated in a copy in the compute dtype on the device: the model keeps
    its fp16 parameters, and (on a GPU) they stay on the CPU between blocks, so models larger
    than the device fit."""
    recipe = tiny_recipe(
        tiny_model_dirs("llama"), f"model.device={device}", "calib.true_sequential=false"
    )
    model, tok = load_model(recipe.model)
    quantize_model(model, tok, recipe, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    if device == "cuda":  # on a CPU-only run every tensor is on the CPU anyway
        assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_blocks_after_the_last_target_are_not_run(tiny_model_dirs):
    """Calibration runs a block only while a later one still has targets to quantize."""
    calls = {0: 0, 1: 0}

    def counting(model):
        for i, block in enumerate(decoder_blocks(model)[1]):
            # copies of the block (the calibration's working copies) keep the hook
            block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        return model

    recipe = tiny_recipe(tiny_model_dirs("llama"), "model.include=['layers[.]0[.]']")
    model, tok = load_model(recipe.model)
    report = quantize_model(counting(model), tok, recipe, progress=False)
    assert {r.name.split(".")[2] for r in report.layers} == {"0"}
    assert calls[0] > 0 and calls[1] == 0

    calls.update({0: 0, 1: 0})
    recipe = tiny_recipe(tiny_model_dirs("llama"), "model.include=['layers[.]1[.]']")
    model, tok = load_model(recipe.model)
    report = quantize_model(counting(model), tok, recipe, progress=False)
    assert {r.name.split(".")[2] for r in report.layers} == {"1"}
    assert calls[0] > 0 and calls[1] > 0  # block 0 still feeds block 1 its inputs
    assert not any(isinstance(m, MixedLinear) for m in decoder_blocks(model)[1][0].modules())


def test_auto_compute_dtype_is_bfloat16_only_where_it_is_native(monkeypatch):
    """On a CPU without AVX512-BF16 or AMX a bfloat16 matmul is emulated (the SmolLM2 training
    step took 500 s instead of seconds): "auto" is float32 there, bfloat16 on GPUs and on CPUs
    that multiply it natively; an explicit dtype is taken as given."""
    from gift_quant.modeling import resolve_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for bf16, amx, want in (
        (False, False, torch.float32),
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
    ):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_dtype("auto", cpu) == want
        assert resolve_dtype("auto", cuda) == torch.bfloat16
        assert resolve_dtype("bfloat16", cpu) == torch.bfloat16


def test_an_evaluation_in_half_precision_leaves_fp32_masters_untouched(tiny_model_dirs):
    """Mid-training evaluation in eval.dtype (train.norms here): trainable fp32 masters are not
    touched at all (same tensor: a DDP run keeps its gradient hooks), and frozen fp32 weights
    come back with their values, not rounded through bf16."""
    from transformers import AutoModelForCausalLM

    from gift_quant.train.norms import TrainedNorms

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs("llama"), dtype=torch.float32)
    model.requires_grad_(False)
    value = 1.0 + 2**-20  # not a bf16 value
    model.model.norm.weight.data.fill_(value)
    norms = TrainedNorms(model)
    master = model.model.norm.weight.data_ptr()
    frozen = model.model.embed_tokens.weight
    frozen.data[0, 0] = value
    before = frozen.detach().clone()
    windows = torch.randint(0, model.config.vocab_size, (2, 16))
    perplexity(model, windows, dtype=torch.bfloat16, progress=False, keep_trainable=True)
    weight = model.model.norm.weight
    assert weight.data_ptr() == master and weight.dtype == torch.float32
    assert torch.all(weight == value)
    assert frozen.dtype == torch.float32 and torch.equal(frozen, before)
    norms.finish()
    # any other evaluation casts every parameter, and gives every value back
    perplexity(model, windows, dtype=torch.bfloat16, progress=False)
    assert torch.all(model.model.norm.weight == value) and torch.equal(frozen, before)
