"""Two builds of the CUDA kernels timed one after the other on the same GPU: this tree's kernel
sources and another commit's (or a directory's), both with this tree's Python, so the same
configurations are timed; prints the time ratios new / base (``bench_kernels --compare``).

    python3 tools/ab_kernels.py --base 0b7dc0d [--out DIR] -- --shapes tuned \\
        --ms 32,64,128,256,512 --bits 4,3 --only wg,cublas

A copy of this tree (``gift_quant``, ``tools``, ``pyproject.toml``) takes the base kernel
sources (``gift_quant/kernels/cuda``: ``*.cu`` and ``fragments.cuh``); the two libraries build
side by side, each under its own ``GIFT_QUANT_CACHE``; then ``tools/bench_kernels.py
--candidates --skip-tinygemm`` and the arguments after ``--`` run on the base copy, then on
this tree, with ``GIFT_QUANT_TUNE=0`` (every configuration timed, the rules' choices routed).
The base run records this tree's commit and ``GIFT_QUANT_AB_BASE=<base>`` among its switches.
Results: ``ab_base.json`` and ``ab_new.json`` under ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = Path("gift_quant/kernels/cuda")
BUILD = (
    "from gift_quant.kernels.cuda import native; "
    "assert native.library() is not None, 'the CUDA kernels did not build (no nvcc or GPU?)'"
)


def kernel_sources(root: Path = ROOT) -> list[Path]:
    """The kernel sources a library is built from, relative to the tree's root."""
    return sorted(
        p.relative_to(root)
        for p in (root / KERNELS).iterdir()
        if p.suffix == ".cu" or p.name.endswith(".cuh")
    )


def base_sources(base: str, root: Path = ROOT) -> dict[Path, bytes]:
    """{relative path: contents} of the kernel sources at ``base``: a directory holding them,
    or a commit of ``root``'s repository. Refused (ValueError, one line) before any build."""
    names = kernel_sources(root)
    if Path(base).is_dir():
        missing = [n.name for n in names if not (Path(base) / n.name).is_file()]
        if missing:
            raise ValueError(f"--base {base}: no {', '.join(missing)} there")
        return {n: (Path(base) / n.name).read_bytes() for n in names}
    out = {}
    for n in names:
        got = subprocess.run(
            ["git", "show", f"{base}:{n.as_posix()}"], cwd=root, capture_output=True, timeout=60
        )
        if got.returncode != 0:
            raise ValueError(
                f"--base {base}: git has no {n.as_posix()} there; name a commit of this "
                "repository or a directory with the kernel sources"
            )
        out[n] = got.stdout
    return out


def base_tree(sources: dict[Path, bytes], dest: Path, root: Path = ROOT) -> Path:
    """A copy of ``root``'s Python (``gift_quant``, ``tools``, ``pyproject.toml``) under
    ``dest`` with the kernel sources replaced by ``sources``."""
    skip = shutil.ignore_patterns("__pycache__", "*.so")
    for name in ("gift_quant", "tools"):
        shutil.copytree(root / name, dest / name, ignore=skip)
    shutil.copy2(root / "pyproject.toml", dest / "pyproject.toml")
    for rel, data in sources.items():
        (dest / rel).write_bytes(data)
    return dest


def _env(tree: Path, cache: Path, **extra: str) -> dict:
    env = dict(os.environ, GIFT_QUANT_CACHE=str(cache), GIFT_QUANT_TUNE="0", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="a commit, or a directory of kernel sources")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then bench_kernels arguments")
    args = ap.parse_args()
    bench = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    try:
        sources = base_sources(args.base)
    except ValueError as exc:
        ap.error(str(exc))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gq-ab-") as tmp:
        tmp = Path(tmp)
        base = base_tree(sources, tmp / "base")
        trees = {"base": base, "new": ROOT}
        caches = {"base": tmp / "cache-base", "new": tmp / "cache-new"}
        # the base copy has no git history: it records the commit this tree records (its
        # Python is this tree's), and the base among its switches
        sys.path.insert(0, str(ROOT))
        from gift_quant.testing import run_environment

        commit = run_environment(shared=False)["commit"]
        extra = {"base": {"GIFT_QUANT_AB_BASE": args.base, "GIFT_QUANT_COMMIT": commit}, "new": {}}
        if os.environ.get("GIFT_QUANT_CACHE"):
            caches["new"] = Path(os.environ["GIFT_QUANT_CACHE"])
        envs = {k: _env(trees[k], caches[k], **extra[k]) for k in trees}
        print(f"building the two libraries side by side (base: {args.base})", flush=True)
        builds = {
            k: subprocess.Popen([sys.executable, "-c", BUILD], cwd=trees[k], env=envs[k])
            for k in trees
        }
        if any(p.wait() != 0 for p in builds.values()):
            sys.exit("a build failed (see above); nothing timed")
        for k in ("base", "new"):
            cmd = [sys.executable, str(trees[k] / "tools" / "bench_kernels.py"), "--candidates"]
            cmd += ["--skip-tinygemm", "--out", str(out), "--name", f"ab_{k}.json", *bench]
            print(f"timing the {k} build: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, cwd=trees[k], env=envs[k], check=True)
    sys.path.insert(0, str(ROOT / "tools"))
    from kernel_tables import print_comparison

    runs = [json.loads((out / f"ab_{k}.json").read_text()) for k in ("base", "new")]
    print_comparison(*runs)


if __name__ == "__main__":
    main()
