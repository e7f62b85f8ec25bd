"""Everything the package writes gets the modes the umask asks for: safetensors creates its
files 0600 and ``tempfile.mkdtemp`` its directories 0700, so every writer that goes through
them resets the modes before renaming the result into place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import build_tiny, tiny_recipe

UMASK = 0o027  # not the usual 022: a hard-coded 0644 / 0755 fails too


@pytest.fixture
def umask():
    old = os.umask(UMASK)
    try:
        yield
    finally:
        os.umask(old)


def wrong_modes(root: Path) -> dict[str, str]:
    """Paths under ``root`` (itself included) whose mode differs from what ``open()`` and
    ``mkdir()`` give under ``UMASK``."""
    wrong = {}
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        if mode != (0o777 if path.is_dir() else 0o666) & ~UMASK:
            wrong[path.relative_to(root).as_posix()] = oct(mode)
    return wrong


def test_recover_output_and_exports_follow_the_umask(tiny_model_dirs, tmp_path, umask):
    """A LoRA recover run (its quantized export, checkpoints, adapter, reports) and a
    gptq+lora export of it."""
    pytest.importorskip("peft")
    from gift_quant.cli import main
    from gift_quant.pipeline import recover

    train = ["train.method=lora", "train.steps=2", "train.batch_size=1", "train.grad_accum=1"]
    train += ["train.seq_len=32", "train.save_every=1", "calib.true_sequential=false"]
    train += ["calib.num_samples=4", "eval.max_tokens=256"]
    run = tmp_path / "run"
    recover(tiny_recipe(tiny_model_dirs("llama"), *train), run, progress=False)
    assert (run / "lora_adapter" / "adapter_model.safetensors").is_file()
    assert (run / "quantized" / "model.safetensors").is_file()
    assert wrong_modes(run) == {}

    engine = tmp_path / "engine"
    args = ["export", str(run / "quantized"), "--format", "gptq+lora", "--out", str(engine)]
    assert main([*args, "-q"]) == 0
    assert wrong_modes(engine) == {}


def test_cache_follows_the_umask(tiny_tokenizer, tmp_path, monkeypatch, umask):
    """The embedded model's fp16 conversion (a tiny stand-in for the GGUF) and generated
    training text, both written through a temporary directory into the cache."""
    from gift_quant import assets
    from gift_quant.recipe import TrainConfig
    from gift_quant.train.data import generate_sequences

    cache = tmp_path / "cache"
    monkeypatch.setenv("GIFT_QUANT_CACHE", str(cache))
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: tmp_path / "stand-in.gguf")
    model = build_tiny("llama")
    monkeypatch.setattr(assets, "load_gguf", lambda *args, **kwargs: (model, tiny_tokenizer))

    converted = assets.default_model_dir()
    assert (converted / "model.safetensors").is_file()
    cfg = TrainConfig(data="generated:2", seq_len=16, gen_batch_size=2)
    generated = generate_sequences(model.float(), tiny_tokenizer, cfg, progress=False)
    assert generated.parent.parent == cache
    assert wrong_modes(cache) == {}
