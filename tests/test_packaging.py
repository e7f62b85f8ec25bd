"""A non-editable install ships every file of the package tree.

An editable install (the README's) reads the checkout, so a package or data file missing from
``pyproject.toml`` only shows in a built wheel: ``gift_quant.kernels.cuda`` and its ``.cu``
sources were missing, and every import of the GPU routes would have failed after
``pip install .``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package_files() -> list[str]:
    """The files of gift_quant/ and recipes/: git's list in a checkout (so that ignored and
    untracked files do not count), else the tree as it is."""
    done = subprocess.run(
        ["git", "ls-files", "gift_quant", "recipes"], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout.split()
    skip = ("__pycache__", ".egg-info")
    return [
        p.relative_to(ROOT).as_posix()
        for name in ("gift_quant", "recipes")
        for p in sorted((ROOT / name).rglob("*"))
        if p.is_file() and p.suffix != ".pyc" and not any(s in str(p) for s in skip)
    ]


def test_the_wheel_holds_every_file_of_the_package_tree(tmp_path) -> None:
    src = tmp_path / "src"
    files = _package_files()
    for rel in [*files, "pyproject.toml", "README.md"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, src / rel)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
        + ["-q", "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("gift_quant-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    # recipes/ ships as the package gift_quant.recipes (package-dir)
    expected = [f"gift_quant/{f}" if f.startswith("recipes/") else f for f in files]
    assert len(expected) > 50
    missing = [f for f in expected if f not in shipped]
    assert not missing, missing
