"""The command line: quantize -> eval with --json, and bad input that names the fix."""

import json
import re

import pytest

from gift_quant.cli import main

TINY = [
    "--set",
    "calib.num_samples=8",
    "--set",
    "calib.seq_len=64",
    "--set",
    "quant.group_size=32",
    "--set",
    "saliency.count=4",
]


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_quantize_then_eval(tiny_model_dirs, tmp_path, capsys):
    model = tiny_model_dirs("mistral")
    out = tmp_path / "q"
    assert main(["quantize", "--model", model, *TINY, "--out", str(out), "--json", "-q"]) == 0
    result = last_json(capsys)
    assert result["num_layers"] == 14 and 4 < result["bits_per_weight"] < 6
    assert result["seconds_total"] > 0 and (out / "recipe.yaml").is_file()
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    assert main(["eval", str(out), "--text", str(text), "--seq-len", "64", "--json", "-q"]) == 0
    ev = last_json(capsys)
    assert ev["tokens"] > 0 and ev["perplexity"] > 1
    assert (
        main(["eval", "--model", model, "--text", str(text), "--seq-len", "64", "--json", "-q"])
        == 0
    )
    assert last_json(capsys)["perplexity"] != ev["perplexity"]
    # without --json, -q (no log) still shows each text's perplexity
    other = tmp_path / "u.txt"
    other.write_text("A second text about nothing much at all. " * 200)
    argv = ["eval", str(out), "--text", str(text), "--text", str(other), "--seq-len", "64", "-q"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for t in (text, other):
        assert re.search(
            rf"^{re.escape(str(t))}: perplexity \d+\.\d{{3}} over \d+ tokens$", printed, re.M
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "quant.bitz=3"], "did you mean 'quant.bits'"),
        (["--set", "quant.bits=5"], r"quant.bits must be one of \(2, 3, 4, 8\)"),
        (["--set", "quant.group_size=48"], "does not divide the layer width 64"),
        (["--set", "saliency.count=64"], "does not fit a layer 64 columns wide"),
        (["--set", "calib.seq_len=100000"], "exceeds the model's context"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_model_dirs, tmp_path, capsys, args, message):
    model = tiny_model_dirs("llama")
    out = tmp_path / "never"
    code = main(["quantize", "--model", model, *TINY, *args, "--out", str(out), "-q"])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_missing_model_and_short_text(tmp_path, tiny_model_dirs, capsys):
    assert main(["quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such path" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    model = tiny_model_dirs("llama")
    assert main(["eval", "--model", model, "--text", str(short), "--seq-len", "128", "-q"]) == 2
    assert "fewer than one window of 128" in capsys.readouterr().err
    # the default eval window (512) is longer than this model's context (256)
    assert main(["eval", "--model", model, "--text", str(short), "-q"]) == 2
    assert "exceeds the model's context (max_position_embeddings=256)" in capsys.readouterr().err


def test_existing_out_is_refused_before_any_work(tiny_model_dirs, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert (
        main(
            [
                "quantize",
                "--model",
                tiny_model_dirs("llama"),
                "--out",
                str(tmp_path / "taken"),
                "-q",
            ]
        )
        == 2
    )
    assert "already exists" in capsys.readouterr().err
