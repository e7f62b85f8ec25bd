"""Fresh Python processes: importing gift_quant, ``--help`` and every recipe error load none of
torch, transformers, numpy or safetensors; a quiet run prints nothing on stderr; and
transformers' ``from_pretrained`` finds the quantizer after a light import.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

HEAVY = ("torch", "transformers", "numpy", "safetensors")
# ``python -m gift_quant ARGS`` in a fresh process, then the exit code and the heavy modules
# it imported on the last stdout line
RUN_CLI = f"""
import runpy, sys
sys.argv = ["gift_quant", *sys.argv[1:]]
try:
    runpy.run_module("gift_quant", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
QUICK = [  # (arguments, exit code, what it prints)
    (["--help"], 0, "recover"),
    (["recover", "--help"], 0, "runs/recover"),
    (["recover", "--set", "quant.bits=5"], 2, "quant.bits must be one of"),
    (["recover", "--set", "quant.bitz=3"], 2, "did you mean 'quant.bits'"),
    (["recover", "--recipe", "does-not-exist"], 2, "neither a file nor a shipped recipe"),
    (["quantize", "--out", "q", "--set", "quant.method=awq"], 2, "quant.method must be one of"),
    (["recover", "--set", "train.noise=laplace"], 2, "train.noise must be one of"),
    (["recover", "--set", "saliency.metric=owq2"], 2, "did you mean 'owq'"),
    (["recover", "--set", "saliency.layer_ratios={'(': 1}"], 2, "not a valid regular expression"),
    (["quantize", "--out", "q", "--set", "model.exclude=['a[']"], 2, "model.exclude[0] is not"),
    (["recover", "--set", "train.seq_len=1"], 2, "train.seq_len must be >= 2"),
    (["recover", "--set", "eval.seq_len=1"], 2, "eval.seq_len must be >= 2"),
    (["recover", "--set", "eval.text=[]"], 2, "eval.text is empty"),
    (["recover", "--set", "eval.max_tokens=10"], 2, "at least one window of 512 tokens"),
    (["quantize", "--out", "no/such/dir/q"], 2, "create it first (mkdir -p no/such/dir)"),
]


def test_import_does_not_load_torch():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    loaded = f"[m for m in {HEAVY!r} if m in sys.modules]"
    code = f"import sys, gift_quant, gift_quant.cli; print({loaded})"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize("case", QUICK, ids=[" ".join(c[0]) for c in QUICK])
def test_help_and_recipe_errors_do_not_load_torch(case, tmp_path):
    """--help and every recipe error are answered without importing torch, transformers,
    numpy or safetensors (the recipe's choices of quantizer and noise come from registries
    that import their functions on first use)."""
    argv, code, says = case
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", RUN_CLI, *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    *printed, last = out.stdout.strip().splitlines()
    assert last == f"{code} []", out.stderr[-2000:]
    assert says in "\n".join(printed) + out.stderr
    if code == 2:
        assert out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1
    else:
        assert out.stderr == ""


def test_quiet_run_prints_nothing_on_stderr(tiny_model_dirs, tmp_path):
    """-q silences transformers' "Loading weights" bar, and no third-party import notices
    (torchao's missing extensions, torch's pytree deprecations) reach the user."""
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    argv = ["eval", "--model", tiny_model_dirs("llama"), "--text", str(text), "--seq-len", "64"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "gift_quant", *argv, "-q"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]
    assert "perplexity:" in out.stdout


def test_from_pretrained_after_a_light_import(export_dir):
    """The quantizer registers itself when transformers builds its registry, in a fresh
    process where gift_quant was imported first, then transformers."""
    code = (
        "import sys, gift_quant; from transformers import AutoModelForCausalLM; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
        "print(type(m.model.layers[0].mlp.up_proj).__name__)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(export_dir)], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == "MixedLinear", out.stderr[-2000:]
