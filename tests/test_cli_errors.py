"""The README's bad-input table, row by row: every expected failure of the command line is one
``error:`` line naming the fix with exit code 2, found before any expensive work, and nothing
already written is lost or left half-written; the Python API's errors (a damaged export given to
``from_pretrained``, a kernel backend that cannot run here) likewise name the problem.

Each row of ``CASES`` is (category, what is wrong, set-up returning the arguments, message
regex, exit code); the README table is generated from the same rows (``readme_table``), from
``KERNEL_CASES`` and from ``BEHAVIOUR``, whose interrupted, failed and repeated runs are tested in
``test_cli_interrupts.py``. Fresh-process checks (nothing heavy imported) are in
``test_cli_light_import.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, build_tiny

from gift_quant.cli import main


class Ctx:
    """What a case's set-up may use: a scratch dir, the tiny model, a copy of the export."""

    def __init__(self, tmp: Path, model: str, export: Path, monkeypatch=None) -> None:
        self.tmp, self.model, self._export = tmp, model, export
        self.monkeypatch = monkeypatch

    def export(self) -> Path:
        copy = self.tmp / "export"
        if not copy.exists():
            shutil.copytree(self._export, copy)
        return copy

    def out(self) -> str:
        return str(self.tmp / "out")

    def small_disk(self, argv: list[str]) -> list[str]:
        """``argv``, run where the file system reports 1 KiB free."""
        usage = shutil.disk_usage(self.tmp)
        self.monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1024))
        return argv


def _rewrite(path: Path, edit) -> None:
    """Rewrite a safetensors file through ``edit(tensors) -> tensors`` (keeps the metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), path, metadata=meta)


def _edit_header(path: Path, edit) -> None:
    """Change a safetensors header in place (same length, payload untouched)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new.ljust(n) + raw[8 + n :])


def _overwrite_payload(path: Path, key: str) -> None:
    """Set one tensor's bytes to 0xFF, header intact (the issue's corrupted payload)."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + n])[key]["data_offsets"]
    raw[8 + n + start : 8 + n + end] = b"\xff" * (end - start)
    path.write_bytes(bytes(raw))


def _drop(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _poison(key, value):
    def edit(t):
        t[key] = t[key].clone()
        t[key].view(-1)[0] = value
        return t

    return edit


def _swap_shape(header):
    header["model.embed_tokens.weight"]["shape"] = list(
        reversed(header["model.embed_tokens.weight"]["shape"])
    )


def _set_qcfg(d: Path, **values) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(values)
    (d / "config.json").write_text(json.dumps(cfg))


def _model_with(c: Ctx, edit) -> str:
    """A copy of the tiny FP model whose weights went through ``edit(model)``."""
    model = build_tiny("llama")
    with torch.no_grad():
        edit(model)
    path = c.tmp / "bad-model"
    model.save_pretrained(path)
    for f in Path(c.model).glob("tokenizer*"):
        shutil.copy(f, path)
    return str(path)


def _without_tokenizer(c: Ctx) -> str:
    """A copy of the tiny model without its tokenizer files."""
    copy = c.tmp / "no-tokenizer"
    shutil.copytree(c.model, copy)
    for f in copy.glob("*"):
        if f.name.startswith(("tokenizer", "vocab", "special_tokens", "merges", "chat_template")):
            f.unlink()
    return str(copy)


def _text(c: Ctx, text: str) -> str:
    (c.tmp / "t.txt").write_text(text)
    return str(c.tmp / "t.txt")


def _general_lora(c: Ctx) -> list[str]:
    from gift_quant.io.gptq_lora import save_gptq_lora
    from gift_quant.io.load import load_quantized

    engine = c.tmp / "engine"
    save_gptq_lora(load_quantized(c.export()), engine)
    adapter = engine / "salient_lora" / "adapter_model.safetensors"
    _rewrite(adapter, lambda t: {k: v + 0.5 if "lora_A" in k else v for k, v in t.items()})
    (engine / "manifest.json").unlink()  # a hand-made adapter has no manifest
    return ["inspect", str(engine)]


def _run_dir(c: Ctx, *parts: str) -> Path:
    run = c.tmp / "run"
    (run / "quantized").mkdir(parents=True)
    (run / "recipe.yaml").write_text("{}\n")
    for part in parts:
        (run / part).mkdir()
    return run


def _occupied(c: Ctx) -> str:
    (c.tmp / "out").mkdir()
    (c.tmp / "out" / "notes.txt").write_text("mine")
    return c.out()


def _file_out(c: Ctx) -> str:
    (c.tmp / "out").write_text("a file")
    return c.out()


def on_export(damage, command: str, *extra: str):
    """Set-up: damage a copy of the export, then run ``command`` on it."""

    def setup(c: Ctx) -> list[str]:
        damage(c.export())
        return [command, str(c.export()), *extra]

    return setup


def quantize(*extra: str, model=None):
    """Set-up: ``quantize`` of the tiny model (or ``model(c)``) with ``extra`` arguments."""

    def setup(c: Ctx) -> list[str]:
        path = model(c) if model else c.model
        return ["quantize", "--model", path, *TINY, *extra, "--out", c.out()]

    return setup


def recover(*extra: str):
    return lambda c: ["recover", "--model", c.model, *TINY, *extra, "--out", c.out()]


def evaluate(*extra: str, text=None):
    def setup(c: Ctx) -> list[str]:
        texts = ["--text", text(c)] if text else []
        return ["eval", "--model", c.model, *texts, *extra]

    return setup


def _nan_weight(c: Ctx) -> str:
    return _model_with(c, lambda m: m.model.layers[0].mlp.up_proj.weight.view(-1).fill_(math.nan))


def _overflowing(c: Ctx) -> str:
    def edit(m):
        m.model.layers[0].mlp.up_proj.weight.fill_(1000.0)
        m.model.layers[0].mlp.down_proj.weight.fill_(1000.0)

    return _model_with(c, edit)


def _jsonl(c: Ctx) -> str:
    (c.tmp / "t.jsonl").write_text("{oops\n")
    return str(c.tmp / "t.jsonl")


def _unlink(name):
    return lambda d: (d / name).unlink()


def _set_version(d: Path) -> None:
    _set_qcfg(d, format_version=99)


EMBED = "model.embed_tokens.weight"
DOWN = "model.layers.1.mlp.down_proj.qweight"
SALIENT = "model.layers.0.mlp.up_proj.salient_weight"
MODEL_FILE, SALIENT_FILE = "model.safetensors", "salient.safetensors"
CASES = [
    # recipes
    ("recipe", "unknown key", quantize("--set", "quant.bitz=3"), r"did you mean 'quant.bits'", 2),
    (
        "recipe",
        "unsupported bits",
        quantize("--set", "quant.bits=5"),
        r"quant.bits must be one of \(2, 3, 4, 8\)",
        2,
    ),
    ("recipe", "--set without =", quantize("--set", "quant.bits"), r"expects section.key=value", 2),
    (
        "recipe",
        "no such recipe",
        lambda c: ["recover", "--recipe", "quikstart", "--out", c.out()],
        r"did you mean 'quickstart'",
        2,
    ),
    (
        "recipe",
        "group size not dividing a layer (recover: before the FP pass)",
        recover("--set", "quant.group_size=48"),
        r"does not divide the layer width 64",
        2,
    ),
    (
        "recipe",
        "salient budget wider than a layer",
        quantize("--set", "saliency.count=64"),
        r"does not fit a layer 64 columns wide",
        2,
    ),
    (
        "recipe",
        "calib.seq_len beyond the context",
        quantize("--set", "calib.seq_len=100000"),
        r"calib.seq_len=100000 exceeds the model's context",
        2,
    ),
    (
        "recipe",
        "eval.seq_len beyond the context (recover)",
        recover("--set", "eval.seq_len=512", "--set", "eval.max_tokens=1024"),
        r"eval.seq_len=512 exceeds the model's context",
        2,
    ),
    (
        "recipe",
        "include matches no Linear",
        quantize("--set", "model.include=[nomatch]"),
        r"no target Linears matched",
        2,
    ),
    (
        "recipe",
        "training on the held-out text",
        recover("--set", "train.data=wiki-heldout"),
        r"would train on the evaluation articles",
        2,
    ),
    (
        "recipe",
        "unknown model dtype",
        quantize("--set", "model.dtype=float8"),
        r"model.dtype must be one of",
        2,
    ),
    (
        "recipe",
        "norms trained beside a LoRA adapter",
        recover("--set", "train.norms=true", "--set", "train.method=lora"),
        r"train.norms=true trains the norms beside GIFT-SW's salient columns",
        2,
    ),
    # models
    (
        "model",
        "--model path does not exist",
        quantize(model=lambda c: str(c.tmp / "nope")),
        r"no such path",
        2,
    ),
    (
        "model",
        "--model directory without config.json",
        quantize(model=lambda c: str(c.tmp)),
        r"no config.json there",
        2,
    ),
    (
        "model",
        "--model directory without tokenizer files",
        quantize(model=lambda c: _without_tokenizer(c)),
        r"no tokenizer files there \(one of tokenizer.json, tokenizer.model",
        2,
    ),
    (
        "model",
        "hub id while offline",
        quantize(model=lambda c: "no-such-org/no-such-model"),
        r"could not load it from the hub",
        2,
    ),
    (
        "model",
        "model.device=cuda without a GPU",
        recover("--set", "model.device=cuda"),
        r"CUDA device\(s\) are visible; use cpu or auto",
        2,
    ),
    (
        "model",
        "model.device is not a device",
        quantize("--set", "model.device=gpu0"),
        r"is not a device",
        2,
    ),
    (
        "model",
        "NaN in the model's weights",
        quantize(model=_nan_weight),
        r"weight 'model.layers.0.mlp.up_proj.weight' holds NaN or inf",
        2,
    ),
    (
        "model",
        "inf in calibration activations (fp16 overflow)",
        quantize("--set", "calib.dtype=float16", model=_overflowing),
        r"calibration activations entering .* hold NaN or inf",
        2,
    ),
    # data
    (
        "data",
        "text shorter than one window",
        evaluate("--seq-len", "64", text=lambda c: _text(c, "too short")),
        r"fewer than one window of 64",
        2,
    ),
    (
        "data",
        "--text file missing",
        evaluate("--seq-len", "64", text=lambda c: str(c.tmp / "missing.txt")),
        r"is not a file; use wiki",
        2,
    ),
    (
        "data",
        "malformed .jsonl line",
        evaluate("--seq-len", "64", text=_jsonl),
        r"t.jsonl:1: not a JSON line",
        2,
    ),
    (
        "data",
        "--seq-len beyond the context",
        evaluate("--seq-len", "100000"),
        r"--seq-len=100000 exceeds the model's context",
        2,
    ),
    (
        "data",
        "eval given a directory and --model",
        lambda c: ["eval", str(c.export()), "--model", c.model],
        r"not both and not neither",
        2,
    ),
    (
        "data",
        "eval --device cuda without a GPU",
        lambda c: ["eval", str(c.export()), "--device", "cuda"],
        r"--device='cuda' but 0 CUDA",
        2,
    ),
    # outputs
    (
        "output",
        "quantize --out exists",
        lambda c: ["quantize", "--model", c.model, "--out", str(c.tmp)],
        r"already exists",
        2,
    ),
    (
        "output",
        "recover --out is a file",
        lambda c: ["recover", "--model", c.model, *TINY, "--out", _file_out(c)],
        r"exists and is not a directory",
        2,
    ),
    (
        "output",
        "recover --out on a disk without room for the run's outputs (before loading)",
        lambda c: c.small_disk(["recover", "--model", c.model, *TINY, "--out", c.out()]),
        r"writes at least .* \(quantized/ .*, model/ .*, train/checkpoints/ .*\) on the file "
        r"system of .*, which has 1.0 KiB free; free some space or choose an --out on a larger "
        r"disk \(train.save_every",
        2,
    ),
    (
        "output",
        "quantize --out on a disk without room for the export (before loading)",
        lambda c: c.small_disk(["quantize", "--model", c.model, *TINY, "--out", c.out()]),
        r"this command writes at least .* \(export .*\) on the file system of .*, which has "
        r"1.0 KiB free",
        2,
    ),
    (
        "output",
        "export --out on a disk without room for the copy (before loading)",
        lambda c: c.small_disk(["export", str(c.export()), "--format", "mixed", "--out", c.out()]),
        r"this command writes at least .* \(export .*\) on the file system of .*, which has "
        r"1.0 KiB free",
        2,
    ),
    (
        "output",
        "recover --out holds other files",
        lambda c: ["recover", "--model", c.model, *TINY, "--out", _occupied(c)],
        r"holds files that are not a recover run \('notes.txt'",
        2,
    ),
    (
        "output",
        "export --out exists",
        lambda c: ["export", str(c.export()), "--out", str(c.tmp)],
        r"already exists",
        2,
    ),
    # exports
    ("export", "no such directory", lambda c: ["inspect", str(c.tmp / "no")], r"no such path", 2),
    (
        "export",
        "a full-precision model given to inspect",
        lambda c: ["inspect", c.model],
        r"this is a full-precision model, not a quantized checkpoint \(`eval --model",
        2,
    ),
    (
        "model",
        "an export given as the model to quantize",
        quantize(model=lambda c: str(c.export())),
        r"is already quantized \(gift_quant\); quantize and recover take the full-precision",
        2,
    ),
    (
        "export",
        "empty directory",
        lambda c: ["inspect", str(c.tmp)],
        r"no config.json; this is not a model directory",
        2,
    ),
    (
        "export",
        "truncated model.safetensors",
        on_export(lambda d: os.truncate(d / MODEL_FILE, 100), "inspect"),
        r"truncated or corrupt",
        2,
    ),
    (
        "export",
        "salient.safetensors deleted",
        on_export(_unlink(SALIENT_FILE), "eval"),
        r"salient.safetensors is missing",
        2,
    ),
    (
        "export",
        "payload overwritten with 0xFF, header intact",
        on_export(lambda d: _overwrite_payload(d / MODEL_FILE, DOWN), "eval"),
        rf"tensor '{DOWN}' does not match its SHA-256",
        2,
    ),
    (
        "export",
        "embed_tokens deleted",
        on_export(lambda d: _rewrite(d / MODEL_FILE, _drop(EMBED)), "eval"),
        rf"model.safetensors: tensor '{EMBED}' is missing \(corrupt or modified since export",
        2,
    ),
    (
        "export",
        "embed_tokens deleted (--no-verify)",
        on_export(lambda d: _rewrite(d / MODEL_FILE, _drop(EMBED)), "eval", "--no-verify"),
        rf"tensor '{EMBED}' is missing",
        2,
    ),
    (
        "export",
        "header lies about a shape",
        on_export(lambda d: _edit_header(d / MODEL_FILE, _swap_shape), "inspect"),
        r"model.safetensors: its header \(tensor names, shapes or dtypes\) differs",
        2,
    ),
    (
        "export",
        "header lies about a shape (--no-verify)",
        on_export(lambda d: _edit_header(d / MODEL_FILE, _swap_shape), "inspect", "--no-verify"),
        rf"tensor '{EMBED}' has shape \[64, 512\], the model expects \[512, 64\]",
        2,
    ),
    (
        "export",
        "NaN in a weight (--no-verify)",
        on_export(
            lambda d: _rewrite(d / MODEL_FILE, _poison("model.norm.weight", math.nan)),
            "inspect",
            "--no-verify",
        ),
        r"tensor 'model.norm.weight' holds NaN or inf",
        2,
    ),
    (
        "export",
        "inf in a salient column (--no-verify)",
        on_export(
            lambda d: _rewrite(d / SALIENT_FILE, _poison(SALIENT, math.inf)),
            "inspect",
            "--no-verify",
        ),
        rf"tensor '{SALIENT}' holds NaN or inf",
        2,
    ),
    (
        "export",
        "newer format_version",
        on_export(_set_version, "inspect"),
        r"format_version 99 is newer than this gift_quant reads",
        2,
    ),
    (
        "export",
        "config.json not JSON",
        on_export(lambda d: (d / "config.json").write_text("{no"), "inspect"),
        r"not valid JSON",
        2,
    ),
    (
        "export",
        "gptq+lora export with a general (not one-hot) LoRA",
        _general_lora,
        r"is not a one-hot column selector",
        2,
    ),
    (
        "export",
        "recover run trained with LoRA, given to inspect",
        lambda c: ["inspect", str(_run_dir(c, "lora_adapter"))],
        r"is a train.method=lora run",
        2,
    ),
    (
        "export",
        "unfinished recover run",
        lambda c: ["inspect", str(_run_dir(c))],
        r"has no final model yet; rerun the same recover command",
        2,
    ),
]
IDS = [f"{cat}: {what}" for cat, what, *_ in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input(case, tiny_model_dirs, export_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, _, setup, message, code = case
    c = Ctx(tmp_path, tiny_model_dirs("llama"), export_dir, monkeypatch)
    argv = setup(c)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    t0 = time.perf_counter()
    assert main([*argv, "-q"] if "-q" not in argv else argv) == code
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    lines = [x for x in err if x.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert "Traceback" not in "\n".join(err)
    # nothing was written: no --out, no partial sibling, the inputs untouched
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert seconds < 120


def test_the_disk_refusal_suggests_fewer_checkpoints_only_where_there_are(
    tiny_model_dirs, export_dir, tmp_path, capsys, monkeypatch
):
    c = Ctx(tmp_path, tiny_model_dirs("llama"), export_dir, monkeypatch)
    for every, hint in (("10", True), ("0", False)):
        argv = ["recover", "--model", c.model, *TINY, "--set", f"train.save_every={every}"]
        assert main(c.small_disk([*argv, "--out", c.out(), "-q"])) == 2
        line = capsys.readouterr().err.strip()
        assert "train/checkpoints/" in line and ("train.save_every=0" in line) == hint, line


def test_malformed_recipe_file_is_one_line_naming_where(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant:\n  bits: 3\n  group_size: [32\n")
    assert main(["quantize", "--recipe", str(bad), "--out", str(tmp_path / "q"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}:4: not valid YAML"), err


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--seq-len", "1", "must be >= 2"),
        ("--seq-len", "0", "must be >= 2"),
        ("--batch-size", "0", "must be >= 1"),
        ("--max-tokens", "-5", "must be >= 0"),
        ("--seq-len", "x", "expected an integer"),
    ],
)
def test_eval_flags_out_of_range_are_refused(flag, value, says, tmp_path, capsys):
    """0 used to fall back to the recipe's value silently; 1 and negatives crashed later."""
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", str(tmp_path / "nope"), flag, value])
    assert exc.value.code == 2 and f"argument {flag}: {says}" in capsys.readouterr().err


def test_eval_token_cap_below_a_window_names_the_cap(tmp_path, capsys):
    """Refused before any model is loaded (the model named here does not exist)."""
    argv = ["eval", "--model", str(tmp_path / "nope"), "--seq-len", "64", "--max-tokens", "10"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--max-tokens must be 0 (the whole text) or at least one window of 64" in err


def test_truncated_safetensors_is_one_error_line(tiny_model_dirs, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs("llama"), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = str(tmp_path / "q")
    assert main(["quantize", "--model", str(broken), *TINY, "--out", out, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a safetensors file cannot be read" in err[0], err
    assert not Path(out).exists()


def test_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "-q"]
    assert main([*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_from_pretrained_verifies_the_manifest(export_dir, tmp_path):
    """transformers' loader would start from random weights for a deleted tensor (a warning);
    the quantizer checks the export's digests first."""
    from transformers import AutoModelForCausalLM

    from gift_quant.io.checkpoint import CheckpointError

    bad = shutil.copytree(export_dir, tmp_path / "bad")
    _rewrite(bad / MODEL_FILE, _drop(EMBED))
    with pytest.raises(CheckpointError, match=rf"tensor '{EMBED}' is missing"):
        AutoModelForCausalLM.from_pretrained(bad)


KERNEL_CASES = [
    ("unknown backend name", "bogus", False, ValueError, "'bogus' is not a valid Backend"),
    ("backend=triton on the CPU", "triton", True, RuntimeError, "needs a CUDA tensor"),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_kernel_choice_errors(case, export_dir):
    """Python API (the CLI always picks the backend itself): a backend that cannot run here
    is refused by name, at load or at the first matmul -- never a silent fallback."""
    from gift_quant.io.load import load_quantized

    _, backend, at_forward, error, message = case
    if not at_forward:
        with pytest.raises(error, match=message):
            load_quantized(export_dir, backend=backend)
        return
    model = load_quantized(export_dir, backend=backend)
    with pytest.raises(error, match=message):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_eval_window_beyond_the_context_is_refused_before_loading(
    export_dir, tmp_path, capsys, monkeypatch
):
    import gift_quant.io.load as load

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(load, "load_quantized", never)
    assert main(["eval", str(export_dir), "--seq-len", "100000", "-q"]) == 2
    assert "--seq-len=100000 exceeds the model's context" in capsys.readouterr().err
    # a window beyond the run's own token cap names the cap and where it comes from
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    recipe = copy / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("max_tokens: 256", "max_tokens: 100"))
    assert main(["eval", str(copy), "--seq-len", "200", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"eval.max_tokens of {recipe} (--max-tokens overrides it) must be 0" in err


def test_eval_of_a_model_beyond_its_context_is_refused_before_loading(
    tiny_model_dirs, tmp_path, capsys, monkeypatch
):
    """``eval --model DIR``: the window is checked against DIR/config.json before the model
    loads (the default window when --seq-len is not given, named as --seq-len)."""
    import gift_quant.modeling as modeling
    from gift_quant.recipe import EvalConfig

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(modeling, "load_model", never)
    model = tiny_model_dirs("llama")
    limit = json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"]
    assert main(["eval", "--model", model, "--seq-len", str(limit + 1), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"--seq-len={limit + 1} exceeds the model's context" in err, err
    # the default window (eval.seq_len's built-in value) is named as --seq-len, the flag to use
    short = tmp_path / "short"
    shutil.copytree(model, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    assert main(["eval", "--model", str(short), "-q"]) == 2
    err = capsys.readouterr().err
    default = EvalConfig().seq_len
    assert f"--seq-len={default} exceeds the model's context (max_position_embeddings=64)" in err


def test_eval_of_a_model_dir_with_a_damaged_config_json_is_one_line(
    tiny_model_dirs, tmp_path, capsys
):
    """``eval --model DIR`` with a config.json that is not JSON: the loader's error, one line."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs("llama"), broken)
    (broken / "config.json").write_text("{")
    assert main(["eval", "--model", str(broken), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json" in err and len(err.splitlines()) == 1, err


def test_eval_of_a_damaged_config_json_names_the_file(export_dir, tmp_path, capsys):
    """The context check before loading leaves a damaged config.json to the loader."""
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    for text in ("{", "[1]"):
        (copy / "config.json").write_text(text)
        assert main(["eval", str(copy), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert "config.json" in err and len(err.splitlines()) == 1, err


def test_tokenizer_files_of_every_kind_are_found(tmp_path):
    from gift_quant.modeling import check_tokenizer_files

    for name in ("tokenizer.json", "qwen.tiktoken", "sentencepiece.bpe.model", "vocab.txt"):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / name).write_text("x")
        check_tokenizer_files(d, str(d))
    with pytest.raises(FileNotFoundError, match="no tokenizer files there"):
        check_tokenizer_files(tmp_path, str(tmp_path))


# Rows of the README table backed by the dedicated tests above and in test_cli_interrupts.py:
# (area, case, outcome, exit).
BEHAVIOUR = [
    (
        "interrupt",
        "Ctrl-C during training",
        "`interrupted; rerun the same command to resume from step 2`; the rerun resumes "
        "at step 2 and its report counts the whole run",
        "130, then 0",
    ),
    (
        "interrupt",
        "Ctrl-C during quantize",
        "`interrupted; nothing partial was kept, rerun the same command`; no --out",
        "130",
    ),
    (
        "interrupt",
        "kill -9 during export (one file written)",
        "no target directory; the rerun removes the killed writer's hidden partial "
        "sibling and succeeds",
        "-9, then 0",
    ),
    (
        "interrupt",
        "kill -9 during a checkpoint write",
        "the partial checkpoint is ignored and removed; the rerun resumes from the last whole one",
        "0",
    ),
    (
        "output",
        "full disk while writing an export (ENOSPC)",
        "`no space left on the device writing ...; nothing partial was kept, free some "
        "space and rerun the same command`",
        "2, then 0",
    ),
    (
        "recipe",
        "quant.group_size=100, then the corrected rerun",
        "refused before the FP pass with nothing written; the rerun just works",
        "2, then 0",
    ),
    ("output", "rerun of a finished recover", "the report is kept byte for byte", "0"),
    (
        "export",
        "eval / inspect of a gptq+lora export",
        "the adapter is applied: same k per layer and the same perplexity as the mixed export",
        "0",
    ),
    ("any", "`--debug` with any error", "the traceback, then the same `error:` line", "2"),
    ("recipe", "recipe file not valid YAML", "`error: …bad.yaml:4: not valid YAML…`", "2"),
    (
        "data",
        "eval --seq-len 0 or 1, --batch-size 0, --max-tokens -5",
        "`argument --seq-len: must be >= 2…` (usage error, before anything loads)",
        "2",
    ),
    (
        "data",
        "eval --max-tokens below one window",
        "`error: …--max-tokens must be 0 (the whole text) or at least one window…`",
        "2",
    ),
    (
        "data",
        "eval of a model directory or `--model DIR`, window beyond its context",
        "refused from its config.json before the weights load; a cap from the run's recipe is "
        "named as such",
        "2",
    ),
    (
        "data",
        "training file shorter than one window, then a longer one",
        "refused before the quantization stage; the same command with the new file runs",
        "2, then 0",
    ),
    (
        "model",
        "truncated model.safetensors given to quantize",
        "`error: …a safetensors file cannot be read…`",
        "2",
    ),
]


def readme_table() -> str:
    """The README's bad-input table, from CASES, KERNEL_CASES and BEHAVIOUR
    (``python tests/test_cli_errors.py``)."""
    rows = ["| # | area | bad input | message / outcome | exit |", "|---:|---|---|---|---:|"]
    for cat, what, _, message, code in CASES:
        shown = message.replace("\\", "").replace(".*", "…")
        rows.append(f"{cat} | {what} | `error: …{shown}…` | {code}")
    for what, _, _, error, message in KERNEL_CASES:
        rows.append(f"kernel | {what} (Python API) | {error.__name__}: `…{message}…` | raises")
    rows += [" | ".join(r) for r in BEHAVIOUR]
    return "\n".join(rows[:2] + [f"| {i} | {r} |" for i, r in enumerate(rows[2:], 1)])


def test_readme_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert readme_table() in readme, "update README.md: python tests/test_cli_errors.py"


if __name__ == "__main__":
    print(readme_table())
