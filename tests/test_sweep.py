"""tools/sweep_recovery.py: aggregation over seeds, the claims table, and resuming a sweep whose
rows share one quantized start (tiny model, rows run in-process)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("sweep_recovery", ROOT / "tools/sweep_recovery.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)  # puts tools/ on sys.path
import sweep_methods  # noqa: E402
import sweep_report  # noqa: E402


def rec(method, bits, seed, ppl, step=1.0, gpu=100.0, budget=(10, 4, 64)):
    key = {"bits": bits, "method": method}
    if method != "base":
        key.update(seed=seed, steps=budget[0], batch=budget[1], seq_len=budget[2])
    return {
        "key": key,
        "perplexity": ppl,
        "perplexity_fp": 5.0,
        "bits_per_weight": bits + 0.5,
        "step_seconds": step,
        "peak_gpu_mb": gpu,
        "peak_rss_mb": 1000.0,
        "trainable_params": 10,
    }


def fake_report(out: Path, trains: bool) -> dict:
    """What a `recover` run leaves and reports, for runners that skip the work."""
    out.mkdir(parents=True, exist_ok=True)
    for f in ("eval_fp.json", "eval_quantized.json"):
        (out / f).write_text("{}")
    report = {
        "perplexity_recovered": 10.0,
        "perplexity_quantized": 12.0,
        "perplexity_fp": 9.0,
        "eval_tokens": 64,
        "bits_per_weight": 4.5,
        "seconds": {},
    }
    if trains:
        (out / "train").mkdir(exist_ok=True)
        rows = [{"step": i, "seconds": 0.1, "tokens": 4} for i in (1, 2)]
        (out / "train/metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
        report["train"] = {"trainable_params": 1, "tokens": 8, "peak_gpu_mb": 0.0}
        report["train"]["peak_rss_mb"] = 1.0
    else:
        (out / "quantized").mkdir(exist_ok=True)
        (out / "quantized/config.json").write_text("{}")
    return report


def test_mean_std_ratios_and_claims_from_handmade_rows():
    rows = [rec("base", 2, 0, 30.0)]
    rows += [rec("gift-post", 2, s, p) for s, p in enumerate([10.0, 11.0, 12.0])]
    rows += [rec("salient-ft", 2, s, p) for s, p in enumerate([20.0, 21.0, 22.0])]
    rows += [rec("gift-post", 3, s, p) for s, p in enumerate([10.0, 11.0, 12.0])]
    rows += [rec("salient-ft", 3, s, p) for s, p in enumerate([10.5, 11.0, 11.5])]
    rows += [rec("lora", 2, s, p, step=0.5, gpu=150.0) for s, p in enumerate([5.0, 6.0, 7.0])]
    g = sweep_report.groups({"rows": rows})
    post = g[("10x4x64", 2, "gift-post")]
    assert post["n"] == 3 and post["mean"] == 11.0 and post["std"] == 1.0
    assert g[("-", 2, "base")]["n"] == 1 and math.isnan(g[("-", 2, "base")]["std"])
    assert sweep_report.ratio_lines(g) == [
        "10x4x64 w2: lora / GIFT-SW step time 0.50x, peak GPU memory 1.50x"
    ]
    claims = sweep_methods.CLAIMS
    verdicts = [sweep_report.judge(g, "10x4x64", comparisons)[1] for _, comparisons in claims]
    assert verdicts[0] == "unclear"  # holds at w2 (10 apart), within seed noise at w3
    assert verdicts[1] == "not run"  # no pre-mode rows
    assert verdicts[2].startswith("disagrees (partly run")  # LoRA wins at w2; DoRA missing
    assert verdicts[3] == "not run"
    result = sweep_report.judge(g, "10x4x64", sweep_methods.CLAIMS[0][1])[0]
    assert "w2 gift-post 11.00 ± 1.00 vs salient-ft 21.00 ± 1.00: holds" in result


@pytest.fixture
def tiny_sweep_recipe(tiny_model_dirs, wiki_train_text, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text(wiki_train_text[:40_000])
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"""
model: {{name_or_path: "{tiny_model_dirs("llama")}"}}
calib: {{num_samples: 8, seq_len: 64, batch_size: 4, true_sequential: false}}
saliency: {{metric: gift, count: 4}}
quant: {{group_size: 32}}
train: {{data: "{text}", save_every: 0}}
eval: {{seq_len: 64, max_tokens: 1024}}
"""
    )
    return recipe


def test_sweep_resumes_recorded_rows_and_shares_the_quantized_start(
    tiny_sweep_recipe, tmp_path, capsys
):
    from gift_quant.pipeline import recover
    from gift_quant.recipe import load_recipe

    calls = []

    def in_process(out, recipe, overrides):
        calls.append(out.name)
        return recover(load_recipe(recipe, overrides), out, progress=False)

    out = tmp_path / "sweep.json"
    args = ["--machine", "shared", "--recipe", str(tiny_sweep_recipe), "--bits", "4"]
    args += ["--methods", "base", "salient-ft", "--budget", "2x2x32", "--micro-batch", "1"]
    args += ["--work", str(tmp_path / "work"), "--out", str(out)]
    assert sweep.main([*args, "--seeds", "0"], runner=in_process) == 0
    assert len(calls) == 2  # the quantized start (= the base row), then seed 0
    assert sweep.main([*args, "--seeds", "0", "1"], runner=in_process) == 0
    assert len(calls) == 3  # only seed 1 ran

    rows = json.loads(out.read_text())["rows"]
    assert [(r["key"]["method"], r["key"].get("seed")) for r in rows] == [
        ("base", None),
        ("salient-ft", 0),
        ("salient-ft", 1),
    ]
    start = tmp_path / "work/starts" / calls[0]
    for name in calls[1:]:
        assert (tmp_path / "work/rows" / name / "quantized").resolve() == (
            start / "quantized"
        ).resolve()
    for r in rows:
        env = r["environment"]
        assert len(env["commit"]) == 40 and env["shared"] is True and env["torch"]
    base, trained = rows[0], rows[1:]
    for r in trained:
        assert r["key"]["batch"] == 2 and r["key"]["micro_batch"] == 1
        assert r["perplexity_quantized"] == base["perplexity"]  # the same start
        assert r["step_seconds"] > 0 and r["peak_rss_mb"] > 0 and r["tokens"] == 2 * 2 * 31
        # the curve: the start, then every step (eval every max(1, 2 // 10) steps) on the
        # whole protocol, so it ends at the final figure (up to the last bits: training
        # evaluates the GiftLinear form, the final figure the exported MixedLinear)
        assert [x for x, _ in r["curve"]] == [0, 62, 124]
        assert r["curve"][0][1] == base["perplexity"]
        assert r["curve"][-1][1] == pytest.approx(r["perplexity"], rel=1e-4)
    a, b = (r["perplexity"] for r in trained)
    printed = capsys.readouterr().out
    assert f"{(a + b) / 2:.2f} ± {abs(a - b) / math.sqrt(2):.2f}" in printed
    for png in ("sweep_curves.png", "sweep_pareto.png"):
        pytest.importorskip("matplotlib")
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jobs_run_rows_side_by_side_over_the_gpus(tiny_sweep_recipe, tmp_path):
    """--jobs 3 --gpus 2: the one quantized start first, alone; then the trained rows, up to 3
    at a time, each on cuda:0 or cuda:1 (its job slot), each recording concurrent_jobs."""
    import threading
    import time

    lock, running, seen = threading.Lock(), [0], []

    def fake(out, recipe, overrides):
        device = next(o for o in overrides if o.startswith("model.device="))
        trains = "train.method=none" not in overrides
        with lock:
            running[0] += 1
            seen.append((out.parent.name, device, running[0]))
        report = fake_report(out, trains)
        time.sleep(0.3)  # long enough for the pool to overlap rows
        with lock:
            running[0] -= 1
        return report

    out = tmp_path / "sweep.json"
    args = ["--machine", "shared", "--recipe", str(tiny_sweep_recipe), "--bits", "4"]
    args += ["--methods", "base", "salient-ft", "--seeds", "0", "1", "2", "3"]
    args += ["--budget", "2x2x32", "--jobs", "3", "--gpus", "2"]
    args += ["--work", str(tmp_path / "work"), "--out", str(out)]
    assert sweep.main(args, runner=fake) == 0
    assert seen[0] == ("starts", "model.device=cuda:0", 1)  # the start ran alone, first
    trained = seen[1:]
    assert len(trained) == 4 and {d for _, d, _ in trained} == {
        "model.device=cuda:0",
        "model.device=cuda:1",
    }
    assert 1 < max(n for _, _, n in trained) <= 3  # side by side, never more than --jobs
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["key"].get("seed", -1) for r in rows) == [-1, 0, 1, 2, 3]
    assert {r["concurrent_jobs"] for r in rows} == {3}

    # on a fresh machine (work directory gone) the recorded start is remade for the new row,
    # and not recorded a second time
    import shutil

    shutil.rmtree(tmp_path / "work")
    seen.clear()
    args[args.index("3")] = "4"  # seeds 0 1 2 4: one new row
    assert sweep.main(args, runner=fake) == 0
    assert [name for name, _, _ in seen] == ["starts", "rows"]
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["key"].get("seed", -1) for r in rows) == [-1, 0, 1, 2, 3, 4]


def test_a_bad_row_is_refused_before_anything_runs(tmp_path):
    def must_not_run(*_):
        raise AssertionError("a row ran")

    args = ["--machine", "idle", "--methods", "base", "dora", "--work", str(tmp_path)]
    args += ["--out", str(tmp_path / "s.json")]
    with pytest.raises(SystemExit, match=r"row w4 base: train.lr must be > 0, got -1"):
        sweep.main([*args, "--set", "train.lr=-1"], runner=must_not_run)
    with pytest.raises(SystemExit, match="--micro-batch 5 must divide every budget's batch"):
        sweep.main([*args, "--micro-batch", "5"], runner=must_not_run)
    # the rows are named after their metric: a recipe (or --set) that ranks otherwise is refused
    quick = ["--recipe", "quickstart"]  # names owq, the project's default
    with pytest.raises(SystemExit, match=r"row w4 base would rank .*metric=owq, not gift"):
        sweep.main([*args, *quick], runner=must_not_run)
    owq = ["--methods", "gift-owq", "--set", "saliency.metric=gift"]
    with pytest.raises(SystemExit, match=r"row w4 gift-owq would rank .*metric=gift, not owq"):
        sweep.main([*args, *owq], runner=must_not_run)
    assert not (tmp_path / "s.json").exists()


def test_rows_that_run_out_of_gpu_memory_are_retried_one_per_gpu(tiny_sweep_recipe, tmp_path):
    """Rows (and a shared quantized start) that fail out of GPU memory beside others run again
    at the end, one per GPU, the start once and before its rows; they record both
    concurrencies. A row failing for another reason is not retried."""
    import threading
    import time

    lock, calls, running = threading.Lock(), [], set()

    def fake(out, recipe, overrides):
        name = out.name
        with lock:
            calls.append(name)
            assert name not in running, f"{name} ran twice at once"
            running.add(name)
        try:
            time.sleep(0.05)
            seed = next((o for o in overrides if o.startswith("train.seed=")), "")
            first = calls.count(name) == 1
            salient_ft_1 = seed == "train.seed=1" and "train.noise=none" in overrides
            owq_start = {"train.method=none", "saliency.metric=owq"} <= set(overrides)
            if first and (salient_ft_1 or owq_start):
                if salient_ft_1:  # some steps ran before it ran out of memory
                    (out / "train").mkdir(parents=True, exist_ok=True)
                    (out / "train/metrics.jsonl").write_text('{"step": 1}\n')
                raise RuntimeError("recover failed (torch.OutOfMemoryError: CUDA out of memory.)")
            if seed == "train.seed=2":
                raise RuntimeError("recover failed (ValueError: something else)")
            return fake_report(out, bool(seed))
        finally:
            with lock:
                running.discard(name)

    out = tmp_path / "sweep.json"
    args = ["--machine", "shared", "--recipe", str(tiny_sweep_recipe), "--bits", "4"]
    args += ["--methods", "gift-owq", "base", "salient-ft", "--seeds", "0", "1", "2"]
    args += ["--budget", "2x2x32", "--jobs", "3", "--gpus", "2"]
    args += ["--work", str(tmp_path / "work"), "--out", str(out)]
    assert sweep.main(args, runner=fake) == 1  # the seed-2 rows still failed
    rows = json.loads(out.read_text())["rows"]
    got = {(r["key"]["method"], r["key"].get("seed", -1)): r for r in rows}
    assert set(got) == {
        ("base", -1),
        ("gift-owq (before training)", -1),
        ("salient-ft", 0),
        ("salient-ft", 1),
        ("gift-owq", 0),
        ("gift-owq", 1),
    }
    assert got[("salient-ft", 0)]["concurrent_jobs"] == 3
    assert "earlier_concurrent_jobs" not in got[("salient-ft", 0)]
    assert got[("salient-ft", 1)]["concurrent_jobs"] == 2
    assert got[("salient-ft", 1)]["earlier_concurrent_jobs"] == 3
    # the owq start failed out of memory once: its rows never ran beside it, then ran after it
    owq_start = [c for c in calls if c.startswith("w4-")]
    assert len(owq_start) == len(set(owq_start)) + 1
    assert "earlier_concurrent_jobs" not in got[("gift-owq", 0)]
    assert len([c for c in calls if "-s2-" in c]) == 2  # salient-ft and owq, once each


def test_an_out_of_memory_line_above_cudas_hint_is_kept():
    hint = "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions."
    err = f"Traceback ...\nRuntimeError: CUDA error: out of memory\n{hint}\n"
    why = sweep.why_failed(err)
    assert hint in why and "CUDA error: out of memory" in why
    assert any(m in why for m in sweep.OUT_OF_MEMORY)
    assert sweep.why_failed("x\nValueError: bad\n") == "ValueError: bad"
    assert not any(m in sweep.why_failed("ValueError: bad") for m in sweep.OUT_OF_MEMORY)


def test_methods_with_the_same_quantization_share_one_start(tiny_sweep_recipe, tmp_path):
    """gift-owq and gift-owq-b6 quantize alike: one start, made once, before their rows."""
    calls = []

    def fake(out, recipe, overrides):
        calls.append(out.parent.name)
        return fake_report(out, any(o.startswith("train.seed=") for o in overrides))

    out = tmp_path / "sweep.json"
    args = ["--machine", "shared", "--recipe", str(tiny_sweep_recipe), "--bits", "4"]
    args += ["--methods", "gift-owq", "gift-owq-b6", "--seeds", "0", "1"]
    args += ["--budget", "2x2x32", "--jobs", "4", "--work", str(tmp_path / "work")]
    assert sweep.main([*args, "--out", str(out)], runner=fake) == 0
    assert calls.count("starts") == 1 and calls[0] == "starts"
    rows = json.loads(out.read_text())["rows"]
    assert [r["key"]["method"] for r in rows if "seed" not in r["key"]] == [
        "gift-owq (before training)"
    ]


def test_a_fresh_work_directory_with_recorded_starts(tiny_sweep_recipe, tmp_path, monkeypatch):
    """A sweep resumed on another machine: the JSON has the starts, the (relative) work
    directory is new. Rows run in the checkout, not where the sweep started, so the work
    directory is made absolute; the start is made again, a row's link to a start that is gone
    is replaced, and an error in one row fails that row only."""
    import shutil

    seen, broken = [], {"train.seed=1"}

    def fake(out, recipe, overrides):
        assert out.is_absolute()
        seen.append(out.parent.name)
        if broken <= set(overrides):
            raise KeyError("a bug in one row")
        return fake_report(out, any(o.startswith("train.seed=") for o in overrides))

    out = tmp_path / "sweep.json"
    args = ["--machine", "shared", "--recipe", str(tiny_sweep_recipe), "--bits", "4"]
    args += ["--methods", "gift-post", "gift-post-b6", "--budget", "2x2x32", "--jobs", "2"]
    args += ["--out", str(out), "--seeds", "0", "1"]
    monkeypatch.chdir(tmp_path)
    assert sweep.main([*args, "--work", "first"], runner=fake) == 1  # both seed-1 rows failed
    assert len(json.loads(out.read_text())["rows"]) == 3  # the start and the seed-0 rows
    (tmp_path / "second").mkdir()
    shutil.move(tmp_path / "first/rows", tmp_path / "second/rows")
    shutil.rmtree(tmp_path / "first")  # the seed-1 rows' links now point nowhere
    s1 = next(p for p in (tmp_path / "second/rows").iterdir() if "gift-post-w4-s1" in p.name)
    (s1 / "train").mkdir()
    (s1 / "train/metrics.jsonl").write_text("")  # some steps trained by the killed sweep
    seen.clear()
    broken.add("train.b_noise=6")
    assert sweep.main([*args, "--work", "second"], runner=fake) == 1
    assert seen.count("starts") == 1  # made again: its files are not in this work directory
    rows = json.loads(out.read_text())["rows"]
    trained = sorted((r["key"]["method"], r["key"]["seed"]) for r in rows if "seed" in r["key"])
    assert trained == [("gift-post", 0), ("gift-post", 1), ("gift-post-b6", 0)]
    resumed = {r["key"].get("seed"): r.get("resumed_from_earlier_sweep") for r in rows}
    assert resumed[1] is True and resumed[0] is None  # its step time: partly another sweep's


def test_rows_are_placed_by_their_expected_memory():
    """Two GPUs of 100 MiB, rows of 60: one per GPU, the third waits for a release (and goes
    where it fits); small rows share a GPU; a GPU running nothing takes any row."""
    import threading

    from gpu_pool import GpuPool

    pool = GpuPool(jobs=4, gpus=2, capacity_mb=100)
    assert [pool.acquire(60), pool.acquire(60)] == [0, 1]
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(60)))
    waiter.start()
    waiter.join(0.3)
    assert got == [] and waiter.is_alive()  # no GPU has 60 left
    pool.release(1, 60)
    waiter.join(5)
    assert got == [1]
    assert pool.acquire(30) == 0  # 60 + 30 fit on cuda:0
    pool.release(0, 60)
    pool.release(0, 30)
    big = threading.Thread(target=lambda: got.append(pool.acquire(500)))
    big.start()
    big.join(5)  # larger than a GPU, but cuda:0 runs nothing: it must not wait
    assert not big.is_alive() and got[-1] == 0
    assert GpuPool(jobs=1, gpus=0).acquire(10) is None  # no GPUs: the recipe's device


def test_a_rows_memory_need_comes_from_its_methods_recorded_peaks(tmp_path):
    rows = [rec("dora", 4, 0, 10.0, gpu=40000.0), rec("dora", 3, 0, 10.0, gpu=42000.0)]
    rows.append(rec("dora", 2, 0, 10.0, gpu=90000.0))  # another recipe's row (a larger model)
    for r, recipe in zip(rows, ["tiny", "tiny", "big"], strict=True):
        r["key"]["recipe"] = recipe
    (tmp_path / "s.json").write_text(json.dumps({"rows": rows}))
    args = sweep.argparse.Namespace(out=str(tmp_path / "s.json"), work=str(tmp_path), jobs=2)
    args.gpus, args.gpu_memory_mb, args.recipe = 2, 140000.0, "tiny"
    s = sweep.Sweep(args)
    assert s.memory_need("dora") == pytest.approx(1.1 * 42000 + 1536)
    assert s.memory_need("lora") == 0.0  # no row trains with train.method=lora: by count
    # a method that never ran takes the peaks of the methods that train the same way (a new
    # GIFT-SW variant placed by count overfilled the GPUs beside DoRA rows)
    assert s.memory_need("gift-owq-b6") == 0.0
    for method, peak in [("salient-ft", 19000.0), ("gift-post", 12000.0)]:
        s.results["rows"].append(rec(method, 4, 0, 10.0, gpu=peak))
        s.results["rows"][-1]["key"]["recipe"] = "tiny"
    assert s.memory_need("gift-owq-b6") == pytest.approx(1.1 * 19000 + 1536)
    assert s.memory_need("gift-post") == pytest.approx(1.1 * 12000 + 1536)  # its own first
    assert s.memory_need("lora") == 0.0
    assert s.capacity == 140000.0


def test_a_start_that_raises_is_not_made_again_by_each_of_its_rows(tiny_sweep_recipe, tmp_path):
    made = []

    def fake(out, recipe, overrides):
        if "train.method=none" in overrides:
            made.append(out.name)
            raise ValueError("the start's report is not JSON")
        return fake_report(out, True)

    args = ["--machine", "shared", "--recipe", str(tiny_sweep_recipe), "--bits", "4"]
    args += ["--methods", "gift-post", "gift-post-b6", "--seeds", "0", "1", "--jobs", "2"]
    args += ["--budget", "2x2x32", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "s")]
    assert sweep.main(args, runner=fake) == 1
    assert len(made) == 1  # four rows depend on it; none made it again
    assert not (tmp_path / "s").exists() or not json.loads((tmp_path / "s").read_text())["rows"]
