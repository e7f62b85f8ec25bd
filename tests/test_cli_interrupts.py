"""Runs stopped part-way (Ctrl-C, kill -9, a full disk) or refused, then rerun: Ctrl-C is one
line with exit code 130, nothing half-written is kept or read, and the same command then resumes
or just works (a finished run's report is kept byte for byte). Also what ``export`` writes: every
file with the same mode, and a gptq+lora export read back with its adapter.

Most of the README table's ``BEHAVIOUR`` rows (``test_cli_errors.py``) are tested here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, TINY, stored_tensor_bytes

from gift_quant.cli import main

TRAIN = [
    *("--set", "train.steps=4", "--set", "train.batch_size=1", "--set", "train.grad_accum=1"),
    *("--set", "train.seq_len=32", "--set", "train.save_every=2"),
]


def test_failed_validation_then_corrected_rerun_just_works(tiny_model_dirs, tmp_path, capsys):
    """The issue's poisoned run: group_size=100 used to leave recipe.yaml and eval_fp.json."""
    model, out = tiny_model_dirs("llama"), str(tmp_path / "run")
    bad = ["recover", "--model", model, *TINY, "--set", "train.method=none", "-q"]
    assert main([*bad, "--set", "quant.group_size=100", "--out", out]) == 2
    assert "does not divide" in capsys.readouterr().err and not Path(out).exists()
    assert main([*bad, "--out", out, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model_dir"] == str(tmp_path / "run" / "quantized")
    # the final output names the model and the next commands, which accept the run directory
    assert report["next"][0] == f"python -m gift_quant eval {out}"
    assert main(["inspect", out, "--json", "-q"]) == 0
    inspected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert inspected["fp16_bytes"] == report["bytes_fp16"]
    # a rerun of the finished run keeps its report byte for byte
    before = (Path(out) / "report.json").read_bytes()
    assert main([*bad, "--out", out, "--json"]) == 0
    assert (Path(out) / "report.json").read_bytes() == before


def test_ctrl_c_and_kill_9_during_training_resume(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the step-2 checkpoint names the step; a checkpoint write killed later
    leaves a partial sibling that the rerun ignores (and removes) while resuming from step 2."""
    import gift_quant.train.loop as loop

    model, out = tiny_model_dirs("llama"), str(tmp_path / "run")
    capsys.readouterr()  # the fixture's own output when it builds the model here
    argv = ["recover", "--model", model, *TINY, *TRAIN, "--out", out, "-q"]
    real = loop.save_checkpoint
    calls = {"n": 0}

    def save_then_ctrl_c(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(loop, "save_checkpoint", save_then_ctrl_c)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted; rerun the same command to resume from step 2"]
    # A kill -9 while the step-4 checkpoint was being written would leave what checkpoints
    # are written into (a hidden sibling, renamed only when complete) half-full:
    ckpts = Path(out) / "train" / "checkpoints"
    partial = ckpts / ".step-000004.partial-999999999"
    shutil.copytree(ckpts / "step-000002", partial)
    (partial / "state.json").unlink()
    assert main([*argv, "--json"]) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["resumed"] and report["invocations"] == 2
    train = report["train"]
    assert train["resumed_from"] == 2 and train["steps"] == 4 and train["counts"] == "whole run"
    rows = [json.loads(x) for x in (Path(out) / "train/metrics.jsonl").read_text().splitlines()]
    assert train["tokens"] == sum({r["step"]: r["tokens"] for r in rows}.values())
    assert "resumed run: 2 invocations" in (Path(out) / "report.md").read_text()


def test_ctrl_c_during_quantize_leaves_nothing(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    import gift_quant.io.export as export

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_file", ctrl_c)
    out = tmp_path / "q"
    argv = ["quantize", "--model", tiny_model_dirs("llama"), *TINY, "--out", str(out), "-q"]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().endswith("rerun the same command")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_on_export_is_one_line_and_leaves_nothing(
    export_dir, tmp_path, capsys, monkeypatch
):
    import gift_quant.io.export as export

    def full(tensors, path, metadata=None):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(export, "save_file", full)
    out = tmp_path / "copy"
    assert main(["export", str(export_dir), "--format", "mixed", "--out", str(out), "-q"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: no space left on the device writing") and "\n" not in line
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert main(["export", str(export_dir), "--format", "mixed", "--out", str(out), "-q"]) == 0
    # the copy keeps the run's recipe (eval's window length) and report
    for name in ("recipe.yaml", "report.json"):
        assert (out / name).read_text() == (export_dir / name).read_text()


def test_export_needs_room_for_the_weights_it_writes_only(export_dir, tmp_path, monkeypatch):
    """export's disk check counts the tensors the loader reads, from the files' headers: the
    mixed copy all of them, gptq+lora all but the salient columns' file; a stray safetensors
    file and a dangling link beside them change nothing."""
    src = tmp_path / "src"
    shutil.copytree(export_dir, src)
    weights = stored_tensor_bytes(src)  # read before the strays are added
    salient = stored_tensor_bytes(src / "salient.safetensors")
    (src / "notes.safetensors").write_bytes(b"\0" * 10**6)
    (src / "gone.safetensors").symlink_to(tmp_path / "nowhere")
    usage = shutil.disk_usage(tmp_path)
    for fmt, needed in (("mixed", weights), ("gptq+lora", weights - salient)):
        argv = ["export", str(src), "--format", fmt, "--out", str(tmp_path / fmt), "-q"]
        monkeypatch.setattr(shutil, "disk_usage", lambda path, n=needed: usage._replace(free=n - 1))
        assert main(argv) == 2 and not (tmp_path / fmt).exists()
        monkeypatch.setattr(shutil, "disk_usage", lambda path, n=needed: usage._replace(free=n))
        assert main(argv) == 0 and (tmp_path / fmt / "config.json").is_file()


KILL_DURING_EXPORT = """
import sys, time
import gift_quant.io.export as export
from gift_quant.io.load import load_quantized
real = export.save_file
def slow(*args, **kwargs):
    real(*args, **kwargs)
    print("written", flush=True)
    time.sleep(600)
export.save_file = slow
export.save_quantized(load_quantized(sys.argv[1]), sys.argv[2])
"""


def test_kill_9_during_export_leaves_nothing_and_the_rerun_works(export_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_EXPORT, str(export_dir), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "written"  # one file is on disk
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert not out.exists()
    assert [p.name.startswith(".copy.partial-") for p in tmp_path.iterdir()] == [True]
    assert main(["export", str(export_dir), "--format", "mixed", "--out", str(out), "-q"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # the killed writer's leftovers too
    assert main(["inspect", str(out), "--json", "-q"]) == 0


def test_gptq_lora_export_is_read_with_its_adapter(export_dir, tmp_path, capsys):
    """eval/inspect on the engine view used to score the bare GPTQ base (k = 0 everywhere)."""
    engine = tmp_path / "engine"
    assert main(["export", str(export_dir), "--format", "gptq+lora", "--out", str(engine)]) == 0
    capsys.readouterr()
    runs = {}
    for d in (export_dir, engine):
        assert main(["inspect", str(d), "--json", "-q"]) == 0
        runs[d] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [x["num_salient"] for x in runs[engine]["layers"]] == [
        x["num_salient"] for x in runs[export_dir]["layers"]
    ]
    assert min(x["num_salient"] for x in runs[engine]["layers"]) == 4
    assert "salient_lora/" in runs[engine]["adapter"]
    ppl = {}
    for d in (export_dir, engine):
        assert main(["eval", str(d), "--seq-len", "64", "--max-tokens", "256", "--json", "-q"]) == 0
        ppl[d] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert ppl[engine] == ppl[export_dir]


def test_inspect_order_rounding_and_file_modes(export_dir, capsys):
    assert main(["inspect", str(export_dir), "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = [x["name"] for x in result["layers"]]
    blocks = [int(n.split(".")[2]) for n in names]
    assert blocks == sorted(blocks)
    assert result["compression"] == round(result["compression"], 3)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in export_dir.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert "manifest.json" in modes


def test_short_training_text_is_refused_before_quantizing(tiny_model_dirs, tmp_path, capsys):
    """The training file is read before the quantization stage (it used to be read after it),
    and the run then takes the corrected text on the same command."""
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = str(tmp_path / "run")
    argv = ["recover", "--model", tiny_model_dirs("llama"), *TINY, *TRAIN, "--out", out, "-q"]
    assert main([*argv, "--set", f"train.data={short}"]) == 2
    err = capsys.readouterr().err
    assert "the training text has" in err and "train.seq_len" in err
    assert not (tmp_path / "run" / "quantized").exists()
    long = tmp_path / "long.txt"
    long.write_text("Enough words to fill a few training windows of thirty-two tokens. " * 60)
    assert main([*argv, "--set", f"train.data={long}", "--json"]) == 0
