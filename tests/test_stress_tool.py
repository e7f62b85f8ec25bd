"""tools/stress_kernels.py on the CPU: what it records about a wrong output (the GPU part, the
repeated kernel calls, runs on a GPU only)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("stress_kernels", ROOT / "tools/stress_kernels.py")
stress = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stress)


def test_how_wrong_names_the_lost_elements_their_rows_and_column_blocks():
    exact = torch.randn(8, 256, dtype=torch.float64) + 5.0  # no element near 0
    y = exact.to(torch.float16)
    y[2, 70:72] = 0  # a lost sum reads 0
    y[5, 200] = float("nan")
    y[6, 10] += 1.0  # off, but neither 0 nor NaN
    got = stress.how_wrong(y, exact, bound=0.05)
    assert got == dict(elements=4, nan=1, zero=2, rows=[2, 5, 6], col_blocks=[0, 1, 3])


def test_a_right_output_has_nothing_off():
    exact = torch.randn(4, 64, dtype=torch.float64)
    got = stress.how_wrong(exact.to(torch.float16), exact, bound=0.01)
    assert got["elements"] == 0 and got["rows"] == [] and got["col_blocks"] == []


def test_resume_keeps_the_rows_of_the_same_commit_and_iters_and_refuses_other_files(tmp_path):
    row = dict(bits=2, dtype="fp16", M=64, route="mm:t64", calls=80, wrong=0, nondet=0)
    run = tmp_path / "stress_kernels.json"
    rows = [dict(row, commit="a"), dict(row, commit="b"), dict(row, commit="a", calls=400)]
    run.write_text(json.dumps(dict(rows=rows)))
    assert stress.earlier_rows(run, "a", calls=80) == [dict(row, commit="a")]
    bad_rows = ("[1, 2]", "{}", "not json", '{"rows": [1]}', '{"rows": {"a": 1}}')
    bad_rows += (json.dumps(dict(rows=[dict(commit="a", bits=2)])),)  # keys missing
    for text in bad_rows:
        run.write_text(text)
        with pytest.raises(SystemExit, match="--resume .*: not a stress_kernels.json"):
            stress.earlier_rows(run, "a", calls=80)
    with pytest.raises(SystemExit, match="not a stress_kernels.json"):
        stress.earlier_rows(tmp_path / "missing.json", "a", calls=80)


def test_a_case_draws_the_same_inputs_whether_or_not_the_run_was_resumed():
    seeds = {
        stress.case_seed(b, d, M, r)
        for b in (2, 3)
        for d in ("fp16", "bf16")
        for M in (16, 64)
        for r in ("mm:t64", "gemv")
    }
    assert len(seeds) == 16  # one per case
    assert stress.case_seed(2, "fp16", 64, "mm:t64") == stress.case_seed(2, "fp16", 64, "mm:t64")
