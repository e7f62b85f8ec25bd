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


def test_the_wheel_holds_every_file_of_the_package_tree(tmp_path) -> None:
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("gift_quant", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
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
    expected = [
        p.relative_to(src).as_posix()
        for p in sorted((src / "gift_quant").rglob("*"))
        if p.is_file() and p.suffix != ".pyc"
    ]
    expected += [
        f"gift_quant/recipes/{p.relative_to(src / 'recipes').as_posix()}"
        for p in sorted((src / "recipes").rglob("*.yaml"))
    ]
    assert len(expected) > 50
    missing = [f for f in expected if f not in shipped]
    assert not missing, missing
