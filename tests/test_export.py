"""Export format: zero-point conventions, the transformers path, the engine view, bad files."""

import json
import os
import shutil

import pytest
import torch
from conftest import tiny_recipe

import gift_quant  # noqa: F401  (registers the transformers quantizer)
from gift_quant.io.checkpoint import CheckpointError, inspect_checkpoint
from gift_quant.io.export import SALIENT_FILE, save_quantized
from gift_quant.io.gptq_lora import ADAPTER_DIR, save_gptq_lora
from gift_quant.io.load import load_quantized
from gift_quant.modeling import cast_params, load_model
from gift_quant.quantize import quantize_model


def logits32(model, ids):
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        out = cast_params(model, torch.float32)(ids).logits
    cast_params(model, dtype)
    return out


@pytest.fixture(scope="module")
def quantized(tiny_model_dirs, tmp_path_factory):
    """(in-memory model, tokenizer, export dir) for a sym and an asym tiny Llama."""
    made = {}

    def get(sym: bool):
        if sym not in made:
            recipe = tiny_recipe(tiny_model_dirs("llama"), f"quant.sym={str(sym).lower()}")
            model, tok = load_model(recipe.model)
            quantize_model(model, tok, recipe, progress=False)
            out = tmp_path_factory.mktemp("exports") / f"sym-{sym}"
            save_quantized(model, out, tokenizer=tok, recipe=recipe)
            made[sym] = (model, tok, out)
        return made[sym]

    return get


IDS = torch.arange(1, 50).unsqueeze(0)


@pytest.mark.parametrize("sym, fmt", [(True, "gptq"), (False, "gptq_v2")])
def test_zero_point_convention_and_round_trip(quantized, sym, fmt):
    model, _, out = quantized(sym)
    info = inspect_checkpoint(out)
    assert info.checkpoint_format == fmt
    loaded = load_quantized(out, dtype=torch.float32)
    assert torch.equal(loaded(IDS).logits, logits32(model, IDS))
    if not sym:  # an asym group whose weights are all >= 0 has zero-point 0: v1 cannot store it
        import copy

        from gift_quant.quant.packing import pack_cols, unpack_cols

        m2 = copy.deepcopy(model)
        layer = m2.get_submodule("model.layers.0.mlp.down_proj")
        z = unpack_cols(layer.qzeros, layer.bits)
        z[0, 0] = 0
        layer.qzeros = pack_cols(z, layer.bits)
        with pytest.raises(ValueError, match="zero-point of 0 cannot be stored in GPTQ v1"):
            save_quantized(m2, out.parent / "v1", checkpoint_format="gptq")
        assert not (out.parent / "v1").exists()
        v2 = save_quantized(m2, out.parent / "asym-zero-v2")  # auto picks v2 and keeps it
        got = load_quantized(v2).get_submodule("model.layers.0.mlp.down_proj").qzeros
        assert torch.equal(got, layer.qzeros)
    else:  # sym can also be written as v2
        v2 = out.parent / "sym-v2"
        save_quantized(model, v2, checkpoint_format="gptq_v2")
        assert torch.equal(
            load_quantized(v2, dtype=torch.float32)(IDS).logits, logits32(model, IDS)
        )
        qcfg = json.loads((out / "quantize_config.json").read_text())
        assert (qcfg["quant_method"], qcfg["checkpoint_format"], qcfg["sym"]) == (
            "gptq",
            "gptq",
            True,
        )


def test_transformers_from_pretrained_and_generate(quantized):
    from transformers import AutoModelForCausalLM

    model, tok, out = quantized(False)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(hf(IDS).logits, logits32(model, IDS))
    generated = hf.generate(IDS[:, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)


def test_generate_offline_from_the_export_dir(quantized):
    _, _, out = quantized(True)
    model = load_quantized(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The history of", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5


def test_gptq_lora_view_reproduces_the_mixed_layers(quantized, tmp_path):
    from safetensors.torch import load_file

    model, tok, _ = quantized(True)
    out = save_gptq_lora(model, tmp_path / "engine", tokenizer=tok)
    base_dir = tmp_path / "base"  # the plain GPTQ checkpoint alone: no salient columns
    shutil.copytree(out, base_dir, ignore=shutil.ignore_patterns(ADAPTER_DIR))
    base = load_quantized(base_dir, verify=False)  # its manifest lists the adapter files
    folded = load_quantized(out)  # the adapter folded back into salient columns
    adapter = load_file(out / ADAPTER_DIR / "adapter_model.safetensors")
    cfg = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4
    for name, layer in [(n, m) for n, m in model.named_modules() if hasattr(m, "salient_idx")]:
        A = adapter[f"base_model.model.{name}.lora_A.weight"].double()
        B = adapter[f"base_model.model.{name}.lora_B.weight"].double()
        merged = base.get_submodule(name).dequantize(torch.float64) + B @ A
        assert torch.equal(merged, layer.dequantize(torch.float64))
        assert base.get_submodule(name).num_salient == 0
        assert torch.equal(folded.get_submodule(name).salient_idx, layer.salient_idx)
        assert torch.equal(folded.get_submodule(name).dequantize(torch.float64), merged)


def test_inspect_reports_sizes_and_bits(quantized, capsys):
    from gift_quant.cli import main

    _, _, out = quantized(True)
    assert main(["inspect", str(out), "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_layers"] == 14 and result["kind"] == "gift_quant"
    assert 4 < result["bits_per_weight"] < 16
    assert result["weights_bytes_on_disk"] < result["fp16_bytes"]
    assert all(x["num_salient"] == 4 for x in result["layers"])


# --------------------------------------------------------------------------- bad files


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rename_tensor(path, old_suffix, new_suffix):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith(old_suffix))
    tensors[key[: -len(old_suffix)] + new_suffix] = tensors.pop(key)
    save_file(tensors, path, metadata=meta)


def _reshape_tensor(path, suffix):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith(suffix))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, path, metadata=meta)


def _set_version(out, version):
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = version
    (out / "config.json").write_text(json.dumps(cfg))


BAD = {
    "truncated model file": (lambda d: _truncate(d / "model.safetensors"), "truncated or corrupt"),
    "truncated salient file": (lambda d: _truncate(d / SALIENT_FILE), "truncated or corrupt"),
    "deleted salient file": (
        lambda d: os.remove(d / SALIENT_FILE),
        "salient.safetensors is missing",
    ),
    "renamed tensor": (
        lambda d: _rename_tensor(d / "model.safetensors", ".qweight", ".qweights"),
        r"tensor '.*\.qweight' is missing",
    ),
    "renamed salient tensor": (
        lambda d: _rename_tensor(d / SALIENT_FILE, ".salient_weight", ".salient_w"),
        r"salient.safetensors: tensor '.*\.salient_weight' is missing",
    ),
    "wrong shape": (
        lambda d: _reshape_tensor(d / SALIENT_FILE, ".salient_weight"),
        r"salient_weight' is F16\[\d+, 3\], expected F16\[\d+, 4\]",
    ),
    "newer format version": (lambda d: _set_version(d, 99), "format_version 99 is newer"),
    "garbled config": (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    "no config": (lambda d: os.remove(d / "config.json"), "no config.json"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_are_clear_errors(quantized, tmp_path, case):
    damage, message = BAD[case]
    _, _, out = quantized(True)
    bad = _copy(out, tmp_path / "bad")
    damage(bad)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(bad)


def test_empty_dir_non_directory_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_quantized(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_quantized(tmp_path / "file")
    with pytest.raises(CheckpointError, match="no such path"):
        load_quantized(tmp_path / "nowhere")


def test_existing_target_is_never_overwritten(quantized, tmp_path):
    model, _, out = quantized(True)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(FileExistsError, match="already exists"):
        save_quantized(model, out)
    with pytest.raises(FileExistsError, match="already exists"):
        save_gptq_lora(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_interrupted_export_leaves_nothing(quantized, tmp_path, monkeypatch):
    import gift_quant.io.export as export

    model, _, _ = quantized(True)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert list(tmp_path.iterdir()) == []


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.mark.parametrize("name", ["legacy_w4g32_sym", "legacy_w3g32_asym"])
def test_legacy_export_still_loads(name):
    """Exports written by gift_quant 0.1.0 (tests/fixtures/README.md) load, by load_quantized
    and by transformers, and compute the fp32 logits their in-memory model computed."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = os.path.join(FIXTURES, name)
    expected = load_file(os.path.join(path, "expected_logits.safetensors"))
    ids = expected["input_ids"]
    for model in (
        load_quantized(path, dtype=torch.float32),
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
    ):
        with torch.no_grad():
            got = model(ids).logits
        torch.testing.assert_close(got, expected["logits"], rtol=1e-5, atol=1e-6)
