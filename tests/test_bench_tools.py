"""The benchmark tools' own logic (no GPU): what they derive from their measurements."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))


def test_sweep_cluster_variants_divide_the_splits_and_appear_once():
    """``sweep_mma --cluster``: each configuration with the largest cluster of 16, 8, 4 or 2
    blocks dividing the splits it runs, plus 8 and 16 splits in one cluster, at the default
    depth; no configuration twice (two depths used to add the same variants twice)."""
    import sweep_mma

    from gift_quant.kernels.cuda import rules

    K, d = 1024, rules.MMV_DEPTH  # 16 k-steps
    confs = sweep_mma.cluster_variants([(4, 16, d, 1), (4, 16, 2 * d, 1), (2, 6, d, 1)], K)
    assert len(confs) == len(set(confs))
    for _, splits, depth, c in confs:
        assert rules._runs(K, splits) % c == 0
        assert c == 1 or depth == d  # the kernel has clusters at its default depth only
    assert (4, 16, d, 16) in confs and (4, 8, d, 8) in confs and (2, 6, d, 2) in confs
    assert (2, 6, d, 4) not in confs  # 6 splits run as 6: 4 does not divide them


@pytest.mark.parametrize("M, N, K", [(1, 5120, 5120), (2, 4096, 4096), (1, 28672, 4096)])
def test_gemv_sweep_has_even_split_variants(M, N, K):
    """``bench_kernels --sweep``'s GEMV variants include even shares of the k-blocks at the
    largest split count up to the rule's and the next above it (within 1.3x), for each tile;
    no configuration twice."""
    from gemv_variants import gemv_variants

    variants = gemv_variants(M, N, K, 4, 128, 128, 132)
    configs = [c for _, c in variants]
    assert all(configs.count(c) == 1 for c in configs)
    rule = configs[0]["n_split"]
    even = [c for name, c in variants if " even x" in name]
    assert even, "no even-share variant"
    for c in even:
        n_kb = K // c["BLOCK_K"]
        assert n_kb % c["n_split"] == 0 and c["n_split"] <= 1.3 * rule
    below = {c["BLOCK_K"]: c["n_split"] for c in even if c["n_split"] <= rule}
    for bk, s in below.items():  # the largest divisor of the k-blocks at most the rule's count
        n_kb = K // bk
        assert not any(n_kb % t == 0 for t in range(s + 1, rule + 1))


@pytest.mark.parametrize("M,N,K", [(1, 5120, 5120), (2, 4096, 4096), (1, 4096, 11008)])
def test_gemv_split_grid_times_the_rule_and_near_even_shares(M, N, K):
    """``bench_gemv_splits``'s grid: the rule's configuration first, then per k-tile split
    counts whose longest share of the k-blocks (``floor``/``ceil`` of the mean, as the kernel
    deals them) is at most 6% over the mean, within half and twice the rule's target; no
    configuration twice. The longest share is counted here from the kernel's own bounds."""
    from bench_gemv_splits import grid

    from gift_quant.kernels.triton.gemv import gemv_config

    configs = grid(M, N, K, 128, 132, 128)
    assert configs[0] == ("rule", gemv_config(M, N, K, 4, 128, 128, 132))
    cfgs = [c for _, c in configs]
    assert all(cfgs.count(c) == 1 for c in cfgs) and len(cfgs) > 4
    for name, c in configs[1:]:
        n_kb, s = K // c["BLOCK_K"], c["n_split"]
        shares = [(i + 1) * n_kb // s - i * n_kb // s for i in range(s)]
        assert sum(shares) == n_kb and max(shares) * s / n_kb <= 1.06, name
        assert name == f"bk{c['BLOCK_K']}x{s}" and c["BLOCK_M"] == (1 if M == 1 else 2)


def test_gemv_split_table_compares_each_cell_with_its_rule():
    """The table's ratio is the fastest configuration's time over the rule's, per cell."""
    from bench_gemv_splits import table

    cell = dict(N=64, K=128, M=1, bits=4, nsal=0, dtype="fp16")
    cfg = dict(BLOCK_K=64, n_split=2)
    rows = [dict(cell, name="rule", cfg=cfg, us=10.0), dict(cell, name="bk32x4", cfg=cfg, us=8.0)]
    rows += [dict(cell, nsal=128, name="rule", cfg=cfg, us=5.0)]
    out = table(rows)
    assert "| bk32x4 | 8.00 | 0.800 |" in out and "| rule | 5.00 | 1.000 |" in out
    assert "geometric mean over 2 cells: 0.894" in out


def test_edge_logit_diff_is_between_onnxruntime_and_the_torch_loader(tmp_path):
    """``bench_edge``'s ``logits_max_abs_diff`` compares onnxruntime's logits with the torch
    loader's (not one runtime with itself): with onnxruntime's output shifted by a known amount
    at one position, the recorded difference is that amount, up to the two runtimes' own
    rounding; unshifted on the same tiny export it is small but not zero."""
    import argparse

    import numpy as np
    import pytest
    import torch

    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    import bench_edge

    from gift_quant.io.load import load_quantized

    src = Path(__file__).parent / "fixtures" / "legacy_w3g32_asym"
    model = load_quantized(src, dtype=torch.float32)
    windows = torch.randint(
        0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)
    )
    args = argparse.Namespace(work=str(tmp_path), decode=2, prefill=16, repeats=1, table_bits=16)
    shift = 0.5
    call = bench_edge.OrtDecoder.__call__

    def shifted(self, ids, past=None):
        logits, rest = call(self, ids, past)
        if shifted.on and past is None and ids.shape[1] == windows.shape[1]:
            logits = logits.copy()
            logits[0, 3, 5] += shift
        return logits, rest

    shifted.on = True
    mp = pytest.MonkeyPatch()
    mp.setattr(bench_edge.OrtDecoder, "__call__", shifted)
    try:
        row = bench_edge.bench_export(src, args, model, windows)
        assert abs(row["logits_max_abs_diff"] - shift) < 1e-4
        assert not row["logits_within_fp16_tolerance"]
        shifted.on = False  # the ONNX export is reused from --work
        row = bench_edge.bench_export(src, args, model, windows)
    finally:
        mp.undo()
    assert 0 < row["logits_max_abs_diff"] <= row["logits_max_abs"] * 2.0**-11
    assert row["ppl_match_3_significant_digits"]
    assert np.isfinite(row["ppl_onnxruntime"])
    if sys.platform.startswith("linux"):  # the session loads in a child process and holds memory
        assert row["onnx_session_bytes"] > 0


NCU_DETAILS = """==PROF== Connected to process 1
{wg}
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    Duration                         us        17.47
    Elapsed Cycles                cycle       33,347
    Section: Launch Statistics
    Grid Size                                                    256
{gather}
    Section: GPU Speed Of Light Throughput
    Duration                         us         3.39
{wg}
    Section: GPU Speed Of Light Throughput
    Duration                         us        17.76
    Elapsed Cycles                cycle       33,007
{wg}
    Section: GPU Speed Of Light Throughput
    Duration                         us        17.60
""".format(
    wg="  void <unnamed>::mixed_wg_kernel<0, 4, 64, 2>(const uint4 *, int) (32, 8, 1)x(288, 1, 1)"
    ", Context 1, Stream 7, Device 0, CC 9.0",
    gather="  <unnamed>::wg_gather_kernel(const __half *, int) (16, 1, 1)x(256, 1, 1), Context 1"
    ", Stream 7, Device 0, CC 9.0",
)


def test_ncu_summary_takes_medians_per_kernel_and_stall_shares_per_instruction(tmp_path):
    """tools/ncu_summary.py: the details page's metrics per kernel (median over its launches,
    thousands separators read), and the source page's stall samples: each reason's share of
    all samples, the instructions with the most, addresses written ADDR; a file that is not
    the source page's CSV is refused with a one-line error."""
    import ncu_summary

    got = ncu_summary.details(NCU_DETAILS)
    assert set(got) == {"mixed_wg_kernel", "wg_gather_kernel"}
    assert got["mixed_wg_kernel"]["Duration"] == ("us", 17.60, 3)  # median of 17.47/17.76/17.60
    assert got["mixed_wg_kernel"]["Elapsed Cycles"] == ("cycle", (33_347 + 33_007) / 2, 2)
    assert got["mixed_wg_kernel"]["Grid Size"] == ("", 256.0, 1)
    assert got["wg_gather_kernel"] == {"Duration": ("us", 3.39, 1)}
    head = ["Address", "Source", ncu_summary.ALL_SAMPLES, "Instructions Executed"]
    head += ["stall_barrier", "stall_long_sb", "stall_long_sb (Not Issued)"]
    rows = [
        ["0x10", "@!P1  BRA 0x7f1ff900d8c0", "6", "1280", "0", "6", "6"],
        ["0x20", "UCGABAR_WAIT", "3", "1440", "3", "0", "0"],
        ["0x30", "FADD R1, R2, R1", "1", "2,080", "0", "1", "1"],
    ]
    text = '"Kernel Name","k"\n' + "\n".join(",".join(f'"{c}"' for c in r) for r in [head, *rows])
    s = ncu_summary.sass(text, top=2)
    assert s["samples"] == 10 and s["instructions"] == 3
    assert s["reasons"] == {"long_sb": 0.7, "barrier": 0.3}
    assert [t["index"] for t in s["top"]] == [0, 1]
    assert s["top"][0]["code"] == "@!P1  BRA ADDR" and s["top"][0]["executed"] == 1280
    assert s["top"][0]["reasons"] == [("long_sb", 0.6)]
    bad = tmp_path / "details.txt"
    bad.write_text(NCU_DETAILS)
    with pytest.raises(SystemExit, match="not ncu's --page source --csv output"):
        ncu_summary.main(["sass", str(bad)])
    with pytest.raises(SystemExit):
        ncu_summary.main(["sass", str(tmp_path / "missing.csv")])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--shapes", "4096x4000"], "multiple of 64 and K of the group"),
        (["--ms", "16,x"], "invalid literal"),
        (["--nsal", "128,"], "invalid literal"),
    ],
)
def test_bench_configs_reads_every_argument_before_any_work(monkeypatch, argv, says):
    """``bench_configs`` refuses a bad shape, M or salient count in one line before it asks
    for a GPU or builds a layer (here on a machine without one: the message is the
    argument's, not the missing GPU's)."""
    import bench_configs

    monkeypatch.setattr(sys, "argv", ["bench_configs.py", "--names", "wg:64x2x8", *argv])
    with pytest.raises(SystemExit, match=says) as err:
        bench_configs.main()
    assert str(err.value).startswith("bench_configs: ") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("cells", "says"),
    [
        ("5120x5120:4", "expected NxK:bits:M"),
        ("5120x5120:5:512", "bits must be 2, 3 or 4"),
        ("5120x5120:4:0", "M at least 1"),
        ("5120x5000:4:512", "multiple of 64"),
    ],
)
def test_bench_tuning_reads_every_cell_before_any_work(monkeypatch, cells, says):
    """``bench_tuning`` refuses a malformed cell in one line before it asks for a GPU (here on
    a machine without one: the message is the cell's, not the missing GPU's)."""
    import bench_tuning

    argv = ["bench_tuning.py", "--cells", f"4096x4096:4:512,{cells}", "--names", "wg:256x2x1s"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=says) as err:
        bench_tuning.main()
    assert str(err.value).startswith("bench_tuning: ") and "\n" not in str(err.value)


def test_every_kernel_tool_imports_on_a_machine_without_a_gpu():
    """Each script under tools/ that uses the kernels imports (its arguments are read only under
    ``__main__``), and the kernel benchmark finds the custom op it times: a module that moved,
    or an import whose side effect registered the op, breaks these tools on the GPU machine
    first, where a run costs the most."""
    import subprocess

    tools = Path(__file__).resolve().parent.parent / "tools"
    uses = ("gift_quant.kernels", "import bench_kernels")
    names = sorted(p.stem for p in tools.glob("*.py") if any(u in p.read_text() for u in uses))
    assert {"bench_kernels", "bench_configs", "check_kernels", "bench_decode"} <= set(names)
    code = (
        f"import sys; sys.path.insert(0, {str(tools)!r})\n"
        "import importlib\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "import bench_kernels\n"
        "print(bench_kernels.OP)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("gift_quant.mixed_matmul"), done.stdout


def test_decode_rows_of_a_run_stopped_part_way_keep_only_ratios_they_can_make():
    """bench_decode writes its rows after each model's timings: a run stopped after the dense
    and the unfused W4 model gives their ratio and no fused one; the finished run all ratios."""
    import bench_decode

    def speeds(eager, compiled=None):  # tokens/s per batch: (graphs, compiled + graphs)
        per = lambda v: {b: {"tokens_per_s": t} for b, t in v.items()}  # noqa: E731
        return per(eager), (per(compiled) if compiled else None)

    runs = {"fp16": speeds({1: 100.0, 16: 1000.0}, {1: 200.0})}
    runs["w4"] = speeds({1: 150.0, 16: 1200.0})
    rows = bench_decode.table_rows(runs, [1, 16], "fp16")
    assert [(r["batch"], r.get("compiled", False)) for r in rows] == [
        (1, False),
        (16, False),
        (1, True),
    ]
    assert [r.get("ratio") for r in rows] == [1.5, 1.2, None]
    assert not any("ratio_fused" in r or "bound" in r for r in rows)

    runs["fp16_fused"] = speeds({1: 125.0, 16: 1000.0}, {1: 250.0})
    runs["no_matmul"] = speeds({1: 400.0, 16: 2000.0}, {1: 800.0})
    runs["w4_fused"] = speeds({1: 175.0, 16: 1500.0}, {1: 500.0})
    rows = bench_decode.table_rows(runs, [1, 16], "fp16")
    b1 = rows[0]
    assert (b1["ratio"], b1["ratio_fused"], b1["ratio_fused_vs_fp16_fused"]) == (1.5, 1.75, 1.4)
    assert (b1["bound"], b1["bound_vs_fp16_fused"]) == (4.0, 3.2)
    compiled = rows[2]
    assert "ratio" not in compiled and compiled["ratio_fused"] == 2.5


def test_sass_loops_labels_kernels_and_shows_what_changed(capsys):
    """tools/sass_loops.py names a kernel by its template arguments and, against an earlier
    run's rows, prints "before -> now" where a count moved."""
    import sass_loops

    wg = "_ZN44_GLOBAL__N__aa48fb62_11_mixed_wg_cu_25678b8815mixed_wg_kernel"
    wg += "ILb0ELi4ELi64ELi2ELb0ELb0EEEvPK5uint4"
    assert sass_loops.label(wg) == "mixed_wg_kernel<0,4,64,2,0,0>"
    assert sass_loops.label("_Z10gather_kerPKi") == "_Z10gather_kerPKi"
    row = {"source": "mixed_wg.cu", "kernel": "k<1>", "registers": 94, "instructions": 415}
    row |= {"mma": 8, "ops": {"R2UR": 2, "LDS": 12}}
    base = {("mixed_wg.cu", "k<1>"): {**row, "instructions": 423, "ops": {"R2UR": 16, "LDS": 12}}}
    base[("mixed_wg.cu", "k<2>")] = row
    sass_loops.print_table([row], ["R2UR", "LDS"], base)
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| k<1> | 94 | 423 -> 415 | 8 | 16 -> 2 | 12 |"
    assert out[3] == "in the base run only: k<2>"


def test_bench_cpu_compile_refuses_a_directory_without_a_model_before_loading(
    monkeypatch, capsys, tmp_path
):
    """``bench_cpu_compile`` names a directory that holds no model in one line, before it loads
    the fp32 model or compiles anything."""
    import bench_cpu_compile

    monkeypatch.setattr(sys, "argv", ["bench_cpu_compile.py", str(tmp_path), "--idle"])
    monkeypatch.setattr(bench_cpu_compile, "load_quantized", None)  # reached: a TypeError
    with pytest.raises(SystemExit) as err:
        bench_cpu_compile.main()
    assert err.value.code == 2
    assert f"{tmp_path} is not a model directory (no config.json)" in capsys.readouterr().err


def test_bench_loss_checks_both_forms_and_records_its_run(tmp_path):
    """tools/bench_loss.py: both training losses agree on the same logits before they are
    timed, and each JSON row carries the commit, the settings and the ratio to torch's."""
    import subprocess

    out = tmp_path / "loss.json"
    tool = Path(__file__).resolve().parent.parent / "tools" / "bench_loss.py"
    argv = ["--batch", "2", "--seq", "16", "--vocab", "512", "--rounds", "1", "--idle"]
    argv += ["--out", str(out)]
    done = subprocess.run([sys.executable, str(tool), *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["form"] for r in rows] == ["torch cross_entropy", "causal_ce_sum"]
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] > 0
    assert all(r["loss_rel_diff"] < 1e-5 and r["grad_max_abs_diff"] < 1e-5 for r in rows)
    assert all(r["provenance"]["commit"] and r["provenance"]["shared"] is False for r in rows)
    assert all(r["vocab"] == 512 for r in rows)
    assert "| causal_ce_sum |" in done.stdout


def test_bench_loss_refuses_a_window_without_a_next_token():
    import subprocess

    tool = Path(__file__).resolve().parent.parent / "tools" / "bench_loss.py"
    argv = [sys.executable, str(tool), "--seq", "1", "--idle"]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode != 0 and "--seq >= 2" in done.stderr.strip().splitlines()[-1]


def test_bench_rebuild_checks_both_forms_and_records_its_run(tmp_path):
    """tools/bench_rebuild.py: the CPU kernel's and the torch twin's noise-free weights agree
    bit for bit before either is timed; each JSON row carries the commit and the settings."""
    import subprocess

    from gift_quant.kernels import cpu_native

    if cpu_native.library() is None:
        pytest.skip("the CPU kernels could not be built here")
    out = tmp_path / "rebuild.json"
    tool = Path(__file__).resolve().parent.parent / "tools" / "bench_rebuild.py"
    argv = ["--shapes", "128x64,64x96", "--layers", "2", "--rounds", "1", "--idle"]
    done = subprocess.run(
        [sys.executable, str(tool), *argv, "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["form"] for r in rows] == ["torch twin", "CPU kernel"]
    assert all(r["layers"] == 4 and r["elements"] == 2 * (128 * 64 + 64 * 96) for r in rows)
    assert all(r["provenance"]["commit"] and r["provenance"]["shared"] is False for r in rows)
    assert "| CPU kernel |" in done.stdout
    bad = subprocess.run(
        [sys.executable, str(tool), "--shapes", "100x64", "--idle"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "--group 64 does not divide" in bad.stderr
