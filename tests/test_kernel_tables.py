"""bench_kernels' tables and views of saved runs (``tools/kernel_tables.py``, no GPU): the
targets' counts, the comparison of two runs, the K sweep and the shapes it accepts."""

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import kernel_tables  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_route_tables_are_made_from_triton_candidates_only():
    """bench_kernels --candidates times the CUDA kernel's configurations too (to check the
    first-use timing's choice); the Triton route tables it derives must not name them, since
    they serve where the CUDA kernel is not built."""
    cell = dict(N=64, K=128, bits=4)
    res = {"cand": [{**cell, "M": 16, "name": "mma:2x8", "us": 1.0}]}
    res["cand"] += [{**cell, "M": 16, "name": "mm:t64", "us": 2.0}]
    res["cand"] += [{**cell, "M": 32, "name": "mm:t64k", "us": 3.0}]
    assert kernel_tables.best_candidates(res)[(64, 128, 4, 16)] == (1.0, "mma:2x8")
    assert kernel_tables.routes_from(res) == {(64, 128, 4): ((16, "mm:t64"), (32, "mm:t64k"))}


def test_targets_are_counted_on_the_rows_of_a_run(capsys):
    """The README's target counts come from the run's rows: M = 16 cells at >= 1.5x, cells
    below 1.0x per M, M = 128-512 cells below 0.9x, 3/2-bit cells slower than the 4-bit one of
    the same shape and M."""

    def row(bits, M, us, cublas_us):
        s = cublas_us / us
        return dict(N=64, K=128, bits=bits, M=M, us=us, cublas_us=cublas_us, speedup=s)

    rows = [row(4, 16, 10.0, 16.0), row(2, 16, 11.0, 16.0), row(4, 32, 10.0, 9.0)]
    rows += [row(2, 32, 9.0, 9.0), row(4, 128, 10.0, 8.0), row(2, 128, 10.0, 9.5)]
    kernel_tables.print_tables({"rows": rows}, markdown=True)
    out = capsys.readouterr().out
    assert "| 64×128 | ours W4 | 1.60 | 0.90 |" in out
    assert "- M = 16 ≥ 1.5×: 1 of 2 cells; below: 64×128 W2 1.45×" in out
    assert "- below 1.0× at M ≤ 64: 1 cells (0 at M = 16, 1 at M = 32): 64×128 W4 M=32 0.90×" in out
    assert "- W3/W2 slower than W4 at M ≤ 64: 1 cells, by at most 64×128 W2 M=16 1.10×" in out
    assert "- M = 128–512: 0.80–0.95×, 1 of 2 cells below 0.9×" in out
    assert "speed-up over cuBLAS fp16" in out  # a run without a dtype: fp16, as before --dtype
    kernel_tables.print_tables({"rows": rows, "env": {"dtype": "bf16"}}, markdown=True)
    assert "speed-up over cuBLAS bf16\n" in capsys.readouterr().out
    # a run timed in steady state (--sustained) says so over its tables
    kernel_tables.print_tables({"rows": rows, "env": {"protocol": "sustained 1 s"}}, markdown=True)
    assert "speed-up over cuBLAS fp16, timed sustained 1 s\n" in capsys.readouterr().out


def test_cells_slower_than_at_first_use_are_named(capsys):
    """A routed cell that ran more than 1.3x the time its first-use timing measured for the same
    kernel is named under the targets: the H100 run at a8f35e5 kept wg:64x2x7c7g for 4096x14336
    W4 M = 64 at 24.5 us and ran it at 82.2 us; its other cells stayed within 1.2x. M = 1 rows
    of a run from before one row had a bucket of its own are matched to the M = 2 bucket their
    first use was kept under."""
    raw = (RESULTS / "kernels_h100_a8f35e5.json.gz").read_bytes()
    res = json.loads(gzip.decompress(raw))
    gaps = kernel_tables.first_use_gaps(res)
    assert [g[1:6] for g in gaps] == [(4096, 14336, 4, 64, "wg:64x2x7c7g")]
    assert 3.3 < gaps[0][0] < 3.4 and round(gaps[0][6], 1) == 82.2 and round(gaps[0][7], 1) == 24.5
    every = kernel_tables.first_use_gaps(res, factor=0.0)  # each row matched to its first use
    assert len(every) == len(res["rows"]) == 240 and sum(g[4] == 1 for g in every) == 24
    kernel_tables.print_tables(res)
    out = capsys.readouterr().out
    assert (
        "- routed cells over 1.3× their first-use time: 1\n  4096×14336 W4 M=64 wg:64x2x7c7g" in out
    )
    kernel_tables.print_tables({"rows": res["rows"][:3]})  # a run without its tuning record
    assert "first-use time" not in capsys.readouterr().out


def test_two_runs_compare_cell_by_cell_and_configuration_by_configuration():
    """``bench_kernels --compare``: geometric means of new / base times over the cells both
    runs timed, per M for the routed op and cuBLAS, per configuration without its K splits and
    bit width for the candidates, and per M for each cell's fastest candidate."""

    def run(us, cand):
        cell = dict(N=64, K=128, bits=4)
        rows = [dict(cell, M=M, us=u, cublas_us=10.0) for M, u in us.items()]
        return dict(rows=rows, cand=[dict(cell, M=64, name=n, us=u) for n, u in cand.items()])

    base = run({64: 8.0, 128: 9.0}, {"wg:64x2x1": 8.0, "wg:64x2x2": 1.0, "wg:128x4x1": 4.0})
    new = run({64: 2.0, 256: 1.0}, {"wg:64x2x1": 2.0, "wg:64x2x2": 4.0, "wg:128x4x1": 3.0})
    got = kernel_tables.compare(base, new)
    assert got["routed"] == {64: 0.25} and got["cublas"] == {64: 1.0}  # M = 128, 256: one run
    wg = got["candidates"]["wg:64x2 W4"]  # 2/8 and 4/1: geometric mean 1
    assert wg["cells"] == 2 and abs(wg["geomean"] - 1.0) < 1e-12
    assert (wg["min"], wg["max"]) == (0.25, 4.0)
    assert got["candidates"]["wg:128x4 W4"]["geomean"] == 0.75
    assert got["best_candidate"] == {64: 2.0}  # 2.0 (wg:64x2x1) against 1.0 (wg:64x2x2)
    assert kernel_tables._family("mma:4x8c8") == "mma:4c"
    assert kernel_tables._family("mma:2x4k4") == "mma:2k4" != kernel_tables._family("mma:2x4")
    assert kernel_tables._family("mma:1x2k8c2") == "mma:1k8c"
    assert kernel_tables._family("gemv") == "gemv"
    assert kernel_tables._family("wg:64x2x8c8") == "wg:64x2c"
    assert kernel_tables._family("mmv:4x6d16") == "mmv:4" == kernel_tables._family("mmv:4x8")


def test_a_comparison_of_runs_timed_differently_says_so(capsys):
    """A burst run against a steady-state one (``--sustained``) compares the protocols as well
    as the kernels: the comparison names both; runs timed alike (a run from before the option
    counts as a burst) print no such line."""
    rows = [dict(N=64, K=128, bits=4, M=64, us=2.0, cublas_us=10.0)]
    burst, old = {"rows": rows, "env": {"protocol": "burst"}}, {"rows": rows}
    steady = {"rows": rows, "env": {"protocol": "sustained 0.8 s"}}
    kernel_tables.print_comparison(burst, steady)
    assert "timed differently: base burst, new sustained 0.8 s" in capsys.readouterr().out
    kernel_tables.print_comparison(old, burst)
    assert "timed differently" not in capsys.readouterr().out


def test_a_comparison_sets_each_cells_speed_up_side_by_side(capsys):
    """``bench_kernels --compare`` prints the routed W4 cells' speed-ups over cuBLAS base ->
    new (a row per shape, a column per M; "–" where a cell is not in both runs) and, at every
    width, the cells below the targets' floors in each run: 1.0x up to M = 64, 0.9x at M =
    128-512."""

    def row(N, bits, M, us, cublas_us):
        return dict(N=N, K=128, bits=bits, M=M, us=us, cublas_us=cublas_us)

    base = {
        "rows": [row(64, 4, 16, 10.0, 9.0), row(64, 4, 256, 10.0, 8.0), row(128, 3, 256, 4.0, 3.0)]
    }
    new = {
        "rows": [row(64, 4, 16, 8.0, 9.0), row(64, 4, 256, 10.0, 9.5), row(128, 3, 256, 4.0, 4.0)]
    }
    new["rows"].append(row(128, 4, 16, 5.0, 10.0))  # in the new run only: not compared
    for run in (base, new):
        run["rows"].append(row(192, 4, 16, 2.0, 2.0))  # a shape timed at M = 16 alone
    got = kernel_tables.print_comparison(base, new)
    assert got["speedup"][(64, 128, 4, 16)] == (0.9, 1.125)
    out = capsys.readouterr().out
    assert "| 64×128 | 0.90 → 1.12 | 0.80 → 0.95 |" in out  # 9/10 -> 9/8; 8/10 -> 9.5/10
    assert "| 192×128 | 1.00 → 1.00 | – |" in out and "128×128" not in out
    assert "cells below 1.0× at M ≤ 64: base 1, new 0 of 2" in out
    assert "cells below 0.9× at M = 128–512: base 2, new 0 of 2" in out  # 0.80, 0.75 -> 0.95, 1.0
    assert "W4 speed-up over cuBLAS fp16, base -> new" in out and "different" not in out
    bf16 = dict(new, env={"dtype": "bf16"})
    kernel_tables.print_comparison(base, bf16)
    out = capsys.readouterr().out
    assert "different activations: base fp16, new bf16" in out and "cuBLAS fp16/bf16" in out
    kernel_tables.print_comparison(base, {"rows": [row(256, 4, 1, 1.0, 2.0)]})
    assert "no cell (N, K, bits, M) was timed in both runs" in capsys.readouterr().out


def test_compare_reads_a_superseded_run_kept_gzipped(capsys, tmp_path):
    """``bench_kernels --compare BASE NEW`` with BASE as kept in benchmarks/results once a
    later run superseded it (NAME.json.gz) prints what it prints for the plain file."""
    import gzip

    def run(us):
        return {"rows": [dict(N=64, K=128, bits=4, M=16, us=us, cublas_us=10.0)]}

    plain, packed, new = tmp_path / "a.json", tmp_path / "a.json.gz", tmp_path / "b.json"
    plain.write_text(json.dumps(run(8.0)))
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    new.write_text(json.dumps(run(2.0)))
    outs = []
    for base in (plain, packed):
        assert kernel_tables.show_saved(None, [str(base), str(new)], None)
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "M=16 0.250" in outs[0]


def test_a_k_sweep_splits_each_candidate_into_fixed_and_per_step_time(capsys, tmp_path):
    """``bench_kernels --k-sweep``: over shapes that differ only in K, each candidate's times
    on a line fixed + per_step * K / 64 give back that line; the fastest candidate and cuBLAS
    per K; a candidate timed at fewer than three K, and an (N, M, bits) timed at fewer than three
    K, get no fit."""

    def cand(K, name, us, M=64):
        return dict(N=4096, K=K, bits=4, M=M, name=name, us=us, cublas_us=K / 100)

    rows = [cand(K, "wg:64x2x1", 4.5 + 0.32 * K / 64) for K in (1024, 2048, 4096, 8192)]
    rows += [cand(K, "wg:64x2x8", 10.0 + 0.07 * K / 64) for K in (1024, 4096, 8192)]
    rows += [cand(K, "wg:64x4x1", 1.0) for K in (1024, 2048)]  # two K: no fit
    rows += [cand(K, "wg:64x2x1", 1.0, M=32) for K in (1024, 2048)]  # M = 32 at two K
    got = kernel_tables.print_k_sweep({"cand": rows})
    assert list(got) == [(4096, 64, 4)]
    fits = got[(4096, 64, 4)]["fits"]
    assert set(fits) == {"wg:64x2x1", "wg:64x2x8"}
    assert abs(fits["wg:64x2x1"]["fixed_us"] - 4.5) < 1e-9
    assert abs(fits["wg:64x2x1"]["per_step_us"] - 0.32) < 1e-12
    assert abs(fits["wg:64x2x8"]["fixed_us"] - 10.0) < 1e-9 and fits["wg:64x2x8"]["ks"] == 3
    best = got[(4096, 64, 4)]["best"]
    assert best[1024] == ("wg:64x4x1", 1.0, 10.24)  # 1.0 beats 9.62 and 11.12
    assert best[8192] == ("wg:64x2x8", 10.0 + 0.07 * 128, 81.92)  # 18.96 against 45.46
    out = capsys.readouterr().out
    assert "| wg:64x2x1 | 4 | 4.50 | 0.320 |" in out and "| 8192 | 81.9 | wg:64x2x8 | 19.0 |" in out
    kernel_tables.print_k_sweep({"cand": rows[-2:]})
    assert "no (N, M, bits) of this run was timed at three K" in capsys.readouterr().out
    saved = tmp_path / "run.json"  # the saved-run view bench_kernels --k-sweep FILE prints
    saved.write_text(json.dumps({"cand": rows}))
    assert kernel_tables.show_saved(None, None, str(saved))
    assert "| wg:64x2x8 | 3 | 10.00 | 0.070 |" in capsys.readouterr().out
    assert not kernel_tables.show_saved(None, None, None) and capsys.readouterr().out == ""


def test_a_benchmark_shape_is_checked_before_any_work():
    """``bench_kernels --shape NxK``: a shape the benchmark can build, else a one-line error
    that says what would be right."""
    assert kernel_tables.parse_shape("24576x4096") == (24576, 4096)
    assert kernel_tables.parse_shape("960X1536", group=64) == (960, 1536)
    for bad, says in (("4096", "NxK"), ("4096x4096x2", "NxK"), ("100x4096", "multiple of 64")):
        with pytest.raises(ValueError, match=says):
            kernel_tables.parse_shape(bad)
    with pytest.raises(ValueError, match="group"):
        kernel_tables.parse_shape("4096x4000")
