"""GIFT-SW training and the recover pipeline on tiny models: resume, modes, baselines, data."""

import importlib.util
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import stored_tensor_bytes, tiny_recipe
from safetensors.torch import load_file

from gift_quant.io.load import load_quantized
from gift_quant.pipeline import recover
from gift_quant.quantize import check_targets
from gift_quant.run_report import dir_bytes
from gift_quant.validation import check_space, meta_model, planned_writes, trainable_params

TRAIN = [
    "train.steps=6",
    "train.batch_size=2",
    "train.grad_accum=2",
    "train.seq_len=32",
    "train.save_every=3",
    "train.lr=1e-3",
    "calib.true_sequential=false",
]


def run(path, out, *overrides):
    return recover(tiny_recipe(path, *TRAIN, *overrides), out, progress=False)


def check_planned_writes(path, out, report, *overrides):
    """What the disk check planned from the model's config alone, before the run, against
    what the run wrote: each output's tensor bytes and the checkpoints on disk (steps 3 and 6,
    both kept), and the trainable parameters against the training's own count."""
    recipe = tiny_recipe(path, *TRAIN, *overrides)
    meta = meta_model(recipe.model)
    _, _, per_block, plan = check_targets(meta, recipe.model, recipe.saliency, recipe.quant)
    writes = planned_writes(recipe, meta, per_block, plan, new_out=False)
    assert trainable_params(recipe, meta, per_block, plan) == report["train"]["trainable_params"]
    for where in ("quantized/", "model/", "lora_adapter/"):
        written = stored_tensor_bytes(out / where) if (out / where).exists() else 0
        assert writes.get(where, 0) == written, where
    ckpts = sorted((out / "train/checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-000003", "step-000006"]
    one = sum(
        stored_tensor_bytes(ckpts[-1] / f"{f}.safetensors") for f in ("trainable", "optimizer")
    )
    assert writes["train/checkpoints/"] == 2 * one


def test_the_disk_check_counts_only_what_is_left_to_write(tmp_path, monkeypatch):
    """A resumed run needs room only for the outputs it has not finished; the checkpoints
    already on disk count toward those it keeps."""
    from gift_quant.recipe import RecipeError

    out = tmp_path / "run"
    (out / "quantized").mkdir(parents=True)
    (out / "quantized/config.json").write_text("{}")
    ckpt = out / "train/checkpoints/step-000003"
    ckpt.mkdir(parents=True)
    (ckpt / "trainable.safetensors").write_bytes(b"x" * 10)
    writes = {"quantized/": 1000, "model/": 100, "train/checkpoints/": 50}
    usage = shutil.disk_usage(tmp_path)

    def free(n):
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=n))

    free(140)
    check_space(out, writes)  # model/ 100 + checkpoints 50 - 10 there
    free(139)
    with pytest.raises(RecipeError) as exc:
        check_space(out, writes)
    assert "at least 140 B (model/ 100 B, train/checkpoints/ 40 B)" in str(exc.value)
    assert f"on the file system of {tmp_path / 'run'}, which has 139 B free" in str(exc.value)
    # a killed writer's partial model/ (the next write of model/ removes it) counts as free
    writer = subprocess.Popen([sys.executable, "-c", "pass"])
    writer.wait()
    partial = out / f".model.partial-{writer.pid}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x")
    check_space(out, writes)
    shutil.rmtree(partial)
    (out / "model").mkdir()
    (out / "model/config.json").write_text("{}")
    free(0)
    check_space(out, writes)  # the final model is there: nothing is left to write


def test_the_disk_check_plans_the_checkpoints_kept_at_once(tiny_model_dirs):
    """Checkpoints every 2 of 10 steps: 5 are written, 3 are on disk at once (the two kept and
    the new one before the oldest goes); every 3 of 6: 2; only at the end: 1."""

    def planned(*train):
        recipe = tiny_recipe(tiny_model_dirs("llama"), *TRAIN, *train)
        meta = meta_model(recipe.model)
        _, _, per_block, plan = check_targets(meta, recipe.model, recipe.saliency, recipe.quant)
        return planned_writes(recipe, meta, per_block, plan, new_out=False)["train/checkpoints/"]

    one = planned("train.save_every=0")
    assert one > 0
    assert planned() == 2 * one
    assert planned("train.steps=10", "train.save_every=2") == 3 * one


def test_recover_post_gift_end_to_end(tiny_model_dirs, tmp_path, monkeypatch):
    report = run(tiny_model_dirs("llama"), tmp_path / "run")
    # finite, and training changed what the evaluation sees (that it lowers the training loss
    # is test_oracles.py::test_recover_lowers_the_training_loss)
    assert 1 < report["perplexity_quantized"] < math.inf and 1 < report["perplexity_recovered"]
    assert report["perplexity_recovered"] != report["perplexity_quantized"]
    assert report["train"]["steps"] == 6 and report["train"]["trainable_params"] > 0
    out = tmp_path / "run"
    for name in (
        "recipe.yaml",
        "report.json",
        "report.md",
        "quantized/config.json",
        "model/config.json",
        "model/salient.safetensors",
        "train/metrics.jsonl",
    ):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "train/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 7))
    # only the salient columns changed between the quantized start and the recovered model
    q = load_file(out / "quantized/model.safetensors")
    m = load_file(out / "model/model.safetensors")
    assert q.keys() == m.keys() and all(torch.equal(q[k], m[k]) for k in q)
    qs, ms = (
        load_file(out / "quantized/salient.safetensors"),
        load_file(out / "model/salient.safetensors"),
    )
    changed = [k for k in qs if k.endswith("salient_weight") and not torch.equal(qs[k], ms[k])]
    assert len(changed) == 14
    check_planned_writes(tiny_model_dirs("llama"), out, report)
    # a finished run's rerun writes nothing, so no disk is too small for it, even with the
    # quantized start deleted to make room
    shutil.rmtree(out / "quantized")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=0))
    assert run(tiny_model_dirs("llama"), out) == report


def test_norms_train_beside_the_salient_columns(tiny_model_dirs, tmp_path):
    """train.norms=true: every norm weight trains (in fp32) with the salient columns and is
    exported in its own dtype with the trained values; nothing else changes."""
    report = run(tiny_model_dirs("llama"), tmp_path / "run", "train.norms=true")
    out = tmp_path / "run"
    q = load_file(out / "quantized/model.safetensors")
    m = load_file(out / "model/model.safetensors")
    norms = sorted(k for k in q if "norm" in k)
    assert norms and q.keys() == m.keys()
    assert sorted(k for k in q if not torch.equal(q[k], m[k])) == norms  # all norms, only them
    assert all(m[k].dtype == q[k].dtype for k in q)
    ckpt = load_file(out / "train/checkpoints/step-000006/trainable.safetensors")
    for k in norms:
        assert ckpt[k].dtype == torch.float32 and torch.equal(ckpt[k].to(m[k].dtype), m[k])
    salient = load_file(out / "quantized/salient.safetensors")
    columns = sum(v.numel() for k, v in salient.items() if k.endswith("salient_weight"))
    assert report["train"]["trainable_params"] == columns + sum(q[k].numel() for k in norms)
    # the exported model loads with the trained norms
    model = load_quantized(out / "model")
    w = model.get_submodule(norms[0].removesuffix(".weight")).weight.detach()
    assert torch.equal(w.to(m[norms[0]].dtype), m[norms[0]])
    check_planned_writes(tiny_model_dirs("llama"), out, report, "train.norms=true")


def test_norms_need_gift(tiny_model_dirs, tmp_path):
    from gift_quant.recipe import RecipeError

    with pytest.raises(RecipeError, match="train.norms=true .* use train.method=gift"):
        run(tiny_model_dirs("llama"), tmp_path / "run", "train.norms=true", "train.method=lora")
    assert not (tmp_path / "run/quantized").exists()


def test_rerun_resumes_and_refuses_another_recipe(tiny_model_dirs, tmp_path):
    path = tiny_model_dirs("llama")
    first = run(path, tmp_path / "run")
    again = run(path, tmp_path / "run")  # every stage is done: nothing recomputed
    assert again["perplexity_recovered"] == first["perplexity_recovered"]
    with pytest.raises(ValueError, match="different recipe"):
        run(path, tmp_path / "run", "train.lr=2e-3")
    # where a run computes is not what it means: it resumes on another device (a sweep's
    # rows start from a quantized model made on another GPU)
    moved = run(path, tmp_path / "run", "model.device=cpu")
    assert moved["perplexity_recovered"] == first["perplexity_recovered"]


def test_a_start_saved_before_a_key_existed_is_the_same_start(tmp_path):
    """The quantized start's recipe.yaml is re-read with today's defaults: a key it lacks (added
    later, at its default in the run's recipe) is no difference; a key it sets otherwise is."""
    from gift_quant.pipeline import _stage_matches
    from gift_quant.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"name_or_path": "m"}, "quant": {"bits": 3}})
    old = recipe.to_dict()
    old["quant"].pop("sym")  # at its default in ``recipe``
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old))
    assert _stage_matches(tmp_path, recipe)
    old["quant"]["bits"] = 4
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old))
    assert not _stage_matches(tmp_path, recipe)


def test_killed_run_resumes_bit_identically(tiny_model_dirs, tmp_path, monkeypatch):
    import gift_quant.train.loop as train_mod

    path = tiny_model_dirs("llama")
    run(path, tmp_path / "straight")
    real = train_mod.save_checkpoint
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:  # killed right after the step-3 checkpoint
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(path, tmp_path / "killed")
    assert not (tmp_path / "killed/model").exists()
    # a checkpoint written before train.norms existed (its fingerprint lacks the key) resumes
    state_file = tmp_path / "killed/train/checkpoints/step-000003/state.json"
    state = json.loads(state_file.read_text())
    train = json.loads(state["fingerprint"]["train"])
    assert train.pop("norms") is False
    state["fingerprint"]["train"] = json.dumps(train, sort_keys=True)
    state_file.write_text(json.dumps(state))
    resumed = run(path, tmp_path / "killed")
    assert resumed["train"]["resumed_from"] == 3
    a = load_file(tmp_path / "straight/model/salient.safetensors")
    b = load_file(tmp_path / "killed/model/salient.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca = load_file(tmp_path / "straight/train/checkpoints/step-000006/trainable.safetensors")
    cb = load_file(tmp_path / "killed/train/checkpoints/step-000006/trainable.safetensors")
    assert all(torch.equal(ca[k], cb[k]) for k in ca), "fp32 master weights bit-identical"


@pytest.mark.parametrize(
    "variant",
    [
        ["train.noise=none"],
        ["train.noise=uniform"],
        ["train.kd_weight=0.5"],
        ["train.mode=pre"],
        ["train.method=lora"],
    ],
    ids=["salient-ft", "uniform", "distill", "pre", "lora"],
)
def test_recovery_variants(tiny_model_dirs, tmp_path, variant, capsys):
    pytest.importorskip("peft") if "lora" in variant[0] else None
    report = run(tiny_model_dirs("qwen2"), tmp_path / "run", *variant)
    assert report["train"]["trainable_params"] > 0
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run/train/metrics.jsonl").open()]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert 1 < report["perplexity_recovered"] < math.inf
    assert report["perplexity_recovered"] != report["perplexity_quantized"], "training did nothing"
    # the recovered size is what a user deploys: a LoRA run's adapter plus the quantized model
    # it is served on, not the adapter alone
    out = tmp_path / "run"
    check_planned_writes(tiny_model_dirs("qwen2"), out, report, *variant)
    table = (out / "report.md").read_text()
    if "lora" in variant[0]:
        adapter = dir_bytes(out / "lora_adapter")
        assert 0 < adapter < report["bytes_quantized"]
        assert report["bytes_export"] == report["bytes_quantized"] + adapter
        assert report["bytes_adapter"] == adapter
        mib = report["bytes_export"] / 2**20
        assert "| recovered (quantized + adapter) | " in table and f"{mib:.1f} |" in table
        assert f"adapter alone (lora_adapter/): {adapter / 2**10:.1f} KiB" in table
        # `eval OUT` scores quantized/ with the adapter, on the run's own windows
        from gift_quant.cli import main

        assert main(["eval", str(out), "--json", "-q"]) == 0
        ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert ev["perplexity"] == pytest.approx(report["perplexity_recovered"], rel=1e-4)
    else:
        assert report["bytes_adapter"] is None and "adapter" not in table
        assert report["bytes_export"] == dir_bytes(out / "model")


def test_chat_data_trains_on_assistant_tokens_only(tiny_model_dirs, tiny_tokenizer, tmp_path):
    from gift_quant.train.data import IGNORE, build_train_data

    tok = tiny_tokenizer
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    records = [
        {
            "messages": [
                {"role": "user", "content": "Name a city."},
                {"role": "assistant", "content": "Paris is a city."},
            ]
        },
        {"prompt": "What is water?", "response": "Water is a liquid."},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    data = build_train_data(str(path), tok, 48, seed=0)
    batch = data.batch(0, 2)
    for ids, labels, mask in zip(batch.input_ids, batch.labels, batch.attention_mask, strict=True):
        kept = tok.decode(ids[labels != IGNORE])
        assert kept.endswith("<eos>") and ("Paris" in kept or "liquid" in kept)
        assert "Name a city" not in kept and "What is water" not in kept
        assert (labels[mask == 0] == IGNORE).all()


def test_eval_reads_the_recover_output(tiny_model_dirs, tmp_path, capsys):
    from gift_quant.cli import main

    run(tiny_model_dirs("llama"), tmp_path / "run")
    assert (
        main(
            [
                "eval",
                str(tmp_path / "run"),
                "--max-tokens",
                "512",
                "--seq-len",
                "64",
                "--json",
                "-q",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] == 8 * 63 and out["perplexity"] > 1
    model = load_quantized(tmp_path / "run/model")
    assert sum(1 for m in model.modules() if type(m).__name__ == "MixedLinear") == 14
    if importlib.util.find_spec("lm_eval"):  # a run directory keeps its zero-shot figures
        args = ["eval", str(tmp_path / "run"), "--max-tokens", "512", "--seq-len", "64"]
        assert main([*args, "--tasks", "wiki_cloze", "--json", "-q"]) == 0
        acc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["zero_shot"]
        report = json.loads((tmp_path / "run/report.json").read_text())
        assert report["zero_shot"] == acc


def test_recover_evaluates_every_eval_text(tiny_model_dirs, tmp_path):
    """eval.text with two texts: each is scored at every stage (the first text's figures stay
    the report's own keys), and report.md has a row per text."""
    notes = tmp_path / "notes.txt"
    notes.write_text("Notes on nothing in particular, written twice over. " * 120)
    texts = f'eval.text=["wiki-heldout", "{notes}"]'
    report = run(tiny_model_dirs("llama"), tmp_path / "run", "train.steps=2", texts)
    per = report["eval_texts"]
    assert list(per) == ["wiki-heldout", str(notes)]
    assert per["wiki-heldout"]["recovered"] == report["perplexity_recovered"]
    assert per[str(notes)]["fp"] != per["wiki-heldout"]["fp"]
    for e in per.values():
        assert e["tokens"] > 0 and all(
            1 < e[k] < math.inf for k in ("fp", "quantized", "recovered")
        )
    md = (tmp_path / "run" / "report.md").read_text()
    assert f"| {notes} | {per[str(notes)]['tokens']} |" in md


def test_a_run_stopped_before_training_takes_new_training_settings(tmp_path):
    """A run whose quantized start exists but whose training has no checkpoint (it failed at
    its start: a text too short, out of memory) reruns with other training settings on the same
    start, its stale report dropped; once training has a checkpoint or a final model, or when
    anything else changes (the quantization, the evaluation or export settings that quantized/
    holds), it is refused."""
    from gift_quant.pipeline import _check_recipe
    from gift_quant.recipe import recipe_from_dict
    from gift_quant.validation import recipe_conflict

    def recipe(**sections):
        return recipe_from_dict({"model": {"name_or_path": "m"}, **sections})

    out = tmp_path / "run"
    (out / "quantized").mkdir(parents=True)
    (out / "train").mkdir()  # made before the first step
    (out / "recipe.yaml").write_text(recipe(train={"method": "none"}).to_yaml())
    (out / "report.json").write_text("{}")
    assert recipe_conflict(out, recipe(train={"lr": 2e-3})) is None
    for other in ({"quant": {"bits": 3}}, {"train": {"mode": "pre"}}, {"eval": {"seq_len": 256}}):
        assert "different recipe" in recipe_conflict(out, recipe(**other)), other
    _check_recipe(out, recipe(train={"lr": 2e-3}))  # the new settings replace the old ones
    assert not (out / "report.json").exists() and "0.002" in (out / "recipe.yaml").read_text()
    (out / "train" / "checkpoints" / "step-2").mkdir(parents=True)
    assert "different recipe" in recipe_conflict(out, recipe(train={"lr": 3e-3}))
