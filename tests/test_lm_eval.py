"""Zero-shot evaluation through lm-eval (gift_quant/lm_eval.py) on the local offline task.

The oracle is a direct log-likelihood scoring of the same items with the model (the sum of
the continuation tokens' log-probabilities, argmax over the four choices), not lm-eval.
"""

import builtins
import json
from importlib.resources import files

import pytest
import torch

pytest.importorskip("lm_eval")

from gift_quant.cli import main  # noqa: E402
from gift_quant.lm_eval import run_tasks  # noqa: E402


def _direct_accuracy(model, tok, limit: int | None = None) -> float:
    lines = (files("gift_quant.tasks") / "wiki_cloze.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines[:limit]]
    correct = 0
    for item in items:
        ctx = tok(item["context"]).input_ids
        scores = []
        for choice in item["choices"]:
            whole = tok(item["context"] + " " + choice).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
            cont = range(len(ctx), len(whole))
            scores.append(sum(float(logp[t - 1, whole[t]]) for t in cont))
        correct += int(max(range(4), key=scores.__getitem__) == item["label"])
    return correct / len(items)


def test_local_task_accuracy_matches_direct_scoring(tiny_model_dirs, tiny_tokenizer, capfd):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs("llama"), dtype=torch.float32)
    results = run_tasks(model.eval(), tiny_tokenizer, ["wiki_cloze"])
    acc = results["wiki_cloze"]["acc"]
    assert acc == pytest.approx(_direct_accuracy(model, tiny_tokenizer), abs=1e-9)
    assert 0 <= results["wiki_cloze"]["acc_norm"] <= 1
    assert "Running loglikelihood requests" in capfd.readouterr().err
    # -q: lm-eval's scoring bars and its note about the model passed in are off
    quiet = run_tasks(model.eval(), tiny_tokenizer, ["wiki_cloze"], limit=4, progress=False)
    err = capfd.readouterr().err
    assert "Running loglikelihood requests" not in err and "Tokenizing inputs" not in err
    assert "already-initialized" not in err
    assert quiet["wiki_cloze"]["acc"] == pytest.approx(
        _direct_accuracy(model, tiny_tokenizer, 4), abs=1e-9
    )


@pytest.mark.slow
def test_local_task_on_smollm2_matches_direct_scoring():
    """The real model: the first 12 items (lm-eval's --limit takes the first documents)."""
    from gift_quant.modeling import load_model
    from gift_quant.recipe import ModelConfig

    model, tok = load_model(ModelConfig())
    model = model.float().eval()
    results = run_tasks(model, tok, ["wiki_cloze"], limit=12)
    assert results["wiki_cloze"]["acc"] == pytest.approx(_direct_accuracy(model, tok, 12))


def test_unknown_task_and_missing_lm_eval_are_one_line_errors(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "never-loaded"  # the task check comes before any model is read
    assert main(["eval", str(missing), "--tasks", "wiki_cloze,no_such_task", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown lm-eval task(s) no_such_task offline" in err and "wiki_cloze" in err
    assert len(err.splitlines()) == 1

    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec",
        lambda name, *a: None if name == "lm_eval" else real_find_spec(name, *a),
    )
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.split(".")[0] == "lm_eval":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert main(["eval", str(missing), "--tasks", "wiki_cloze", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lm-eval, which is not installed" in err and "gift_quant[eval]" in err
    assert len(err.splitlines()) == 1


def test_eval_tasks_leave_an_export_verifiable(tiny_model_dirs, tmp_path, capsys):
    """`eval EXPORT --tasks` writes nothing into the export: its report.json is checksummed in
    manifest.json, and a changed one made the next load refuse the export as corrupt."""
    out = tmp_path / "q"
    tiny = ["--set", "calib.num_samples=8", "--set", "calib.seq_len=64"]
    tiny += ["--set", "quant.group_size=32", "--set", "saliency.count=4"]
    assert main(["quantize", "--model", tiny_model_dirs("llama"), *tiny, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    args = ["eval", str(out), "--text", str(text), "--seq-len", "64", "--json", "-q"]
    assert main([*args, "--tasks", "wiki_cloze"]) == 0
    assert (
        0
        <= json.loads(capsys.readouterr().out.splitlines()[-1])["zero_shot"]["wiki_cloze"]["acc"]
        <= 1
    )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(args) == 0  # verified again on load
