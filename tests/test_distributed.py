"""Data-parallel recovery on CPU processes (gloo), launched by torchrun like a user would.

The runs train on chat data whose rows carry different numbers of label tokens (only the
assistant turns count), so ranks and micro-batches hold uneven token counts: the 2-process
result equals the 1-process one only if the loss is weighted per token across all of them.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_oracles import chat_model_dir

from gift_quant.pipeline import recover
from gift_quant.recipe import load_recipe

SETTINGS = [
    "calib.num_samples=8",
    "calib.seq_len=64",
    "calib.true_sequential=false",
    "quant.group_size=32",
    "saliency.count=4",
    "eval.seq_len=64",
    "eval.max_tokens=512",
    "train.steps=3",
    "train.batch_size=4",
    "train.grad_accum=2",
    "train.seq_len=32",
    "train.save_every=1",
    "train.lr=1e-3",
    "train.dtype=float32",
]


LAUNCHERS = {
    "torchrun": lambda n: ["-m", "torch.distributed.run", f"--nproc_per_node={n}", "--standalone"],
    # accelerate's multi-process launcher is torchrun underneath; on CPU the ranks use gloo
    "accelerate": lambda n: [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        f"--num_processes={n}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
    ],
}


def chat_data(path):
    """16 chat records, answers of 16 different lengths: every split of a batch is uneven."""
    words = "the river runs past the old town and on to the sea".split()
    records = [
        {"prompt": f"Say {i} words.", "response": " ".join(words[: 1 + i % len(words)]) + "."}
        for i in range(16)
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def settings(model, data) -> list[str]:
    return [f"model.name_or_path={model}", f"train.data={data}", *SETTINGS]


def torchrun(
    nproc: int, model, data, out, start, launcher: str = "torchrun", parallel: str = "ddp"
) -> None:
    """``torchrun -m gift_quant recover`` (or ``accelerate launch``) with exactly the
    single-process recipe, from the single-process run's quantized start ``start``.

    The quantized start is shared rather than recomputed: GPTQ in the launched processes (one
    thread each) sums in another order than in the test process and can round a compensated
    salient weight to the neighbouring fp16 value; training then keeps that one-ulp offset
    (it showed as a 9.5e-7 difference at a salient weight near 1.2e-3, i.e. 2**-20)."""
    out.mkdir()
    shutil.copytree(start / "quantized", out / "quantized")
    for name in ("eval_fp.json", "eval_quantized.json"):
        shutil.copy(start / name, out / name)
    recipe = out.parent / f"{out.name}.yaml"
    settings_ = [*settings(model, data), f"train.parallel={parallel}"]
    recipe.write_text(load_recipe(None, settings_).to_yaml())
    cmd = [
        sys.executable,
        *LAUNCHERS[launcher](nproc),
        "-m",
        "gift_quant",
        "recover",
        "--recipe",
        str(recipe),
        "--out",
        str(out),
        "-q",
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def trained(out, step=3):
    return load_file(out / f"train/checkpoints/step-{step:06d}/trainable.safetensors")


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "train/metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tiny_model_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    model, data = chat_model_dir(tiny_model_dirs, tmp), chat_data(tmp / "chat.jsonl")
    out = tmp / "one"
    recover(load_recipe(None, settings(model, data)), out, progress=False)
    return model, data, out


@pytest.mark.parametrize(
    "launcher, parallel", [("torchrun", "ddp"), ("accelerate", "ddp"), ("torchrun", "fsdp")]
)
def test_two_gloo_processes_match_one_process(single, tmp_path, launcher, parallel):
    if launcher == "accelerate":
        pytest.importorskip("accelerate", reason="needs accelerate (the [assets] extra)")
    model, data, one = single
    torchrun(2, model, data, tmp_path / "two", one, launcher, parallel)
    a, b = trained(one), trained(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 14
    # same global batch: equal up to float summation order (fp32 compute), far below what the
    # three steps moved the weights
    moved = max(float((a[k] - trained(one, 2)[k]).abs().max()) for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |1 proc - 2 procs| {diff:.2e}, last step moved weights by {moved:.2e}")
    assert moved > 1e-4 and diff < 1e-3 * moved
    # the reported loss is the same token mean over the global batch
    assert [r["loss"] for r in metrics(one)] == pytest.approx(
        [r["loss"] for r in metrics(tmp_path / "two")], rel=1e-5
    )
    export = load_file(tmp_path / "two/model/salient.safetensors")
    assert all(torch.equal(export[k], b[k].half()) for k in b)


def test_checkpoint_of_two_processes_resumes_in_one(single, tmp_path):
    model, data, one = single
    two = tmp_path / "two"
    torchrun(2, model, data, two, one)
    # as if the 2-process run had been killed after step 2: resume it with one process
    shutil.rmtree(two / "model")
    shutil.rmtree(two / "train/checkpoints/step-000003")
    for done in ("eval_recovered.json", "report.json", "report.md"):  # written after training
        (two / done).unlink()
    report = recover(load_recipe(None, settings(model, data)), two, progress=False)
    assert report["train"]["resumed_from"] == 2
    a, b = trained(one), trained(two)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-6, diff
