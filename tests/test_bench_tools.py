"""The benchmark tools' own logic (no GPU): what they derive from their measurements."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import bench_kernels  # noqa: E402


def test_route_tables_are_made_from_triton_candidates_only():
    """bench_kernels --candidates times the CUDA kernel's configurations too (to check the
    first-use timing's choice); the Triton route tables it derives must not name them, since
    they serve where the CUDA kernel is not built."""
    cell = dict(N=64, K=128, bits=4)
    res = {"cand": [{**cell, "M": 16, "name": "mma:2x8", "us": 1.0}]}
    res["cand"] += [{**cell, "M": 16, "name": "mm:t64", "us": 2.0}]
    res["cand"] += [{**cell, "M": 32, "name": "mm:t64k", "us": 3.0}]
    assert bench_kernels.best_candidates(res)[(64, 128, 4, 16)] == (1.0, "mma:2x8")
    assert bench_kernels.routes_from(res) == {(64, 128, 4): ((16, "mm:t64"), (32, "mm:t64k"))}
