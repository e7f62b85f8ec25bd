"""tools/provenance.py: every JSON row the tools write says which code and machine made it."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import provenance as prov  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    prov.add_arguments(p)
    return p


def test_fields_name_the_commit_and_the_machine():
    stamp = prov.provenance(shared=True)
    assert set(stamp) == {
        "commit",
        "dirty",
        "python",
        "torch",
        "transformers",
        "triton",
        "cpu",
        "gpu",
        "threads",
        "shared",
    }
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=TOOLS, capture_output=True, text=True
    ).stdout.strip()
    assert stamp["commit"] == head and re.fullmatch(r"[0-9a-f]{40}", head)
    assert isinstance(stamp["dirty"], bool) and stamp["shared"] is True
    import torch
    import transformers

    assert stamp["torch"] == torch.__version__ and stamp["transformers"] == transformers.__version__
    assert stamp["cpu"] and stamp["threads"] == torch.get_num_threads()


def test_shared_flag_from_option_or_environment_else_refused(monkeypatch, capsys):
    monkeypatch.delenv(prov.ENV, raising=False)
    p = parser()
    assert prov.shared_flag(p, p.parse_args(["--idle"])) is False
    assert prov.shared_flag(p, p.parse_args(["--shared"])) is True
    monkeypatch.setenv(prov.ENV, "1")
    assert prov.shared_flag(p, p.parse_args([])) is True
    monkeypatch.setenv(prov.ENV, "0")
    assert prov.shared_flag(p, p.parse_args([])) is False
    monkeypatch.delenv(prov.ENV)
    with pytest.raises(SystemExit):
        prov.shared_flag(p, p.parse_args([]))
    assert "--shared or --idle" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        p.parse_args(["--shared", "--idle"])


def test_merged_rows_keep_their_own_stamp(tmp_path):
    old = {"perplexity": 10.0, "provenance": {"commit": "0" * 40, "shared": False}}
    results = {"rows": {"old": old}}
    now = prov.provenance(shared=True)
    results["rows"]["new"] = prov.stamp({"perplexity": 9.0}, now)
    prov.stamp(results["rows"]["old"], now)  # a rerun touching every row changes nothing
    path = prov.write_json(tmp_path / "sub" / "r.json", results)
    back = json.loads(path.read_text())
    assert back["rows"]["old"]["provenance"] == {"commit": "0" * 40, "shared": False}
    assert back["rows"]["new"]["provenance"] == now
    assert [p.name for p in path.parent.iterdir()] == ["r.json"], "no temporary file left"


def test_every_tool_that_writes_json_stamps_it():
    """Every tool that writes JSON stamps its rows (the common helper here, or the kernel tools'
    ``gift_quant.testing.run_environment``) and writes through a temporary sibling + rename."""
    writers = set()
    for tool in sorted(TOOLS.glob("*.py")):
        if tool.name == "provenance.py":
            continue
        text = tool.read_text()
        if "write_json(" in text:  # provenance's stamp, or the kernel tools' run_environment
            # the machine's-state arguments: provenance's, or through trace_wg's layer_args
            stamped = ("add_arguments(" in text or "layer_args(" in text) and "stamp(" in text
            assert stamped or "run_environment(" in text, tool.name
            writers.add(tool.stem)
        elif "write_text(json" in text or "json.dump(" in text:
            assert "replace(" in text, f"{tool.name}: write to a temporary sibling, then rename"
            assert "run_environment(" in text or "provenance(" in text, tool.name
            writers.add(tool.stem)
    assert {
        "bench_decode",
        "bench_distributed",
        "bench_edge",
        "bench_gpu_scale",
        "bench_kernels",
        "bench_newcomer",
        "bench_quality",
        "bench_recovery",
        "bench_train_cost",
        "check_kernels",
        "check_roundtrip",
        "sweep_mma",
        "sweep_recovery",
    } <= writers


def test_child_processes_see_the_tools_packages(monkeypatch):
    """A tool's child runs this checkout first and then the tool's own PYTHONPATH: replacing
    it would make the child import other packages than the versions the tool's rows record."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/wheels/site", "/more"]))
    env = prov.child_env("/checkout", HF_HUB_OFFLINE="1")
    assert env["PYTHONPATH"].split(os.pathsep) == ["/checkout", "/wheels/site", "/more"]
    assert env["HF_HUB_OFFLINE"] == "1"
    monkeypatch.delenv("PYTHONPATH")
    assert prov.child_env("/checkout")["PYTHONPATH"] == "/checkout"
    sources = "".join(p.read_text() for p in TOOLS.glob("*.py") if p.name != "provenance.py")
    assert '"PYTHONPATH": str(' not in sources  # no tool replaces it any more


def test_a_wrong_caller_commit_is_refused(tmp_path, monkeypatch):
    """GIFT_QUANT_COMMIT names the commit a copied tree was made from; where the copy's git
    shows the name is wrong, the tools refuse it instead of stamping rows with it."""
    from gift_quant.testing import caller_commit

    def git(*args):
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    monkeypatch.delenv("GIFT_QUANT_COMMIT", raising=False)
    assert caller_commit(tmp_path) is None
    monkeypatch.setenv("GIFT_QUANT_COMMIT", "0" * 40)
    assert caller_commit(tmp_path) == "0" * 40  # not a git checkout: nothing to check against
    git("init", "-q")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "tools.py").write_text("y = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    with pytest.raises(SystemExit, match="not a commit of this checkout"):
        caller_commit(tmp_path)  # unknown, and the tree is exactly HEAD: a typo
    monkeypatch.setenv("GIFT_QUANT_COMMIT", head[:10])
    assert caller_commit(tmp_path / "pkg") == head  # resolved; from a subfolder too
    # what the tools write there is not the code that ran
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}")
    assert caller_commit(tmp_path) == head
    (tmp_path / "tools.py").write_text("y = 2\n")  # outside the folder asked from
    with pytest.raises(SystemExit, match="differ from this working tree"):
        caller_commit(tmp_path / "pkg")
    (tmp_path / "tools.py").write_text("y = 1\n")
    (tmp_path / "new.py").write_text("z = 1\n")  # an untracked file is a difference too
    with pytest.raises(SystemExit, match="differ from this working tree"):
        caller_commit(tmp_path)
    monkeypatch.setenv("GIFT_QUANT_COMMIT", "1" * 40)
    assert caller_commit(tmp_path) == "1" * 40  # the copy's git lags behind its files: trusted


@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA GeForce RTX 4090", "4090"),
        ("TITAN RTX", "titan"),
        ("NVIDIA", "gpu"),
        ("", "cpu"),
    ],
)
def test_result_files_are_named_by_the_gpu_that_ran(name, tag):
    # a default result name says which GPU measured it: an H100 run is not filed as an H200's
    assert prov.gpu_tag(name) == tag
