"""Two builds of the CUDA kernels timed one after the other on the same GPU: this tree's kernel
sources and another commit's (or a directory's), both with this tree's Python, so the same
configurations are timed; prints the time ratios new / base (``bench_kernels --compare``).

    python3 tools/ab_kernels.py --base 0b7dc0d [--out DIR] [--side-limit S] -- \\
        --shapes tuned --ms 32,64,128,256,512 --bits 4,3 --only wg,cublas

A copy of this tree (``gift_quant``, ``tools``, ``pyproject.toml``) takes the base kernel
sources (``gift_quant/kernels/cuda``: ``*.cu`` and ``fragments.cuh``); the two libraries build
side by side (the build cache keys each by a digest of its sources); then
``tools/bench_kernels.py --candidates --skip-tinygemm`` and the arguments after ``--`` run on
the base copy, then on this tree, with ``GIFT_QUANT_TUNE=0`` (every configuration timed, the
rules' choices routed). Both builds are called through this tree's ``native.py`` and packed
layout: a base whose ``extern "C"`` entry points differ, or (a commit) whose ``layout.py``
differs, is refused before any build; a directory's sources must share this tree's layout.
``--side-limit S``: each side's timing run is stopped after S seconds, and the A/B ends with a
one-line error naming the side, how long it ran and the last line it printed (a kernel that
never finishes holds its process: the last candidate printed is the one before it).
The base run records this tree's commit and ``GIFT_QUANT_AB_BASE`` (the base's full commit,
or the directory and a digest of its sources) among its switches. Results: ``ab_base.json``
and ``ab_new.json`` under ``--out`` (default benchmarks/results).

``--whole-tree``: the base is a whole tree -- its own ``gift_quant``, ``tools`` and
``pyproject.toml``, so its own layout, entry points, routes and bench -- for a change of the
packed layout itself: a commit (its files taken by ``git archive``; the base run records that
commit) or a directory holding them (used in place; recorded by a digest of its files). The
same configurations are timed where the two trees' rules and candidate lists agree.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = Path("gift_quant/kernels/cuda")
LAYOUT = KERNELS / "layout.py"
BUILD = (
    "from gift_quant.kernels.cuda import native; "
    "assert native.library() is not None, 'the CUDA kernels did not build (no nvcc or GPU?)'"
)
OWN = ("--out", "--name", "--markdown", "--compare", "--profile")  # not passed on to the bench


def kernel_sources(root: Path = ROOT) -> list[Path]:
    """The kernel sources a library is built from, relative to the tree's root."""
    return sorted(
        p.relative_to(root)
        for p in (root / KERNELS).iterdir()
        if p.suffix == ".cu" or p.name.endswith(".cuh")
    )


def entry_points(text: str) -> list[str]:
    """A source's ``extern "C"`` declarations, whitespace normalized."""
    return [" ".join(d.split()) for d in re.findall(r'extern "C" int \w+\([^)]*\)', text)]


def _shown(directory: Path, root: Path = ROOT) -> str:
    """How a base directory is recorded: relative to the tree where it lies inside it, else by
    its name (the results carry no machine's paths; the digest beside it says what it held)."""
    where = directory.resolve()
    return where.relative_to(root).as_posix() if where.is_relative_to(root) else where.name


def _git_show(base: str, rel: Path, root: Path) -> bytes:
    got = subprocess.run(
        ["git", "show", f"{base}:{rel.as_posix()}"], cwd=root, capture_output=True, timeout=60
    )
    if got.returncode != 0:
        raise ValueError(
            f"--base {base}: git has no {rel.as_posix()} there; name a commit of this "
            "repository or a directory with the kernel sources"
        )
    return got.stdout


def base_sources(base: str, root: Path = ROOT) -> tuple[dict[Path, bytes], str]:
    """({relative path: contents} of the kernel sources at ``base``, what the base is: its
    full commit, or the directory and a digest of the sources): a directory holding them, or
    a commit of ``root``'s repository. Refused (ValueError, one line) before any build where
    they are missing or this tree's ``native.py`` / ``layout.py`` could not call them."""
    names = kernel_sources(root)
    if Path(base).is_dir():
        missing = [n.name for n in names if not (Path(base) / n.name).is_file()]
        if missing:
            raise ValueError(f"--base {base}: no {', '.join(missing)} there")
        out = {n: (Path(base) / n.name).read_bytes() for n in names}
        digest = hashlib.sha256(b"".join(out[n] for n in names)).hexdigest()[:16]
        label = f"{_shown(Path(base), root)} (sources sha256 {digest})"
    else:
        out = {n: _git_show(base, n, root) for n in names}
        if _git_show(base, LAYOUT, root) != (root / LAYOUT).read_bytes():
            raise ValueError(
                f"--base {base}: its packed layout ({LAYOUT.name}) differs from this tree's, "
                "which both builds are given; compare commits that share it"
            )
        label = subprocess.run(
            ["git", "rev-parse", "--verify", f"{base}^{{commit}}"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
    for n in names:
        if entry_points(out[n].decode()) != entry_points((root / n).read_text()):
            raise ValueError(
                f"--base {base}: {n.name}'s extern \"C\" entry points differ from this tree's, "
                "through which both builds are called; compare commits that share them"
            )
    return out, label


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


WHOLE = ("gift_quant", "tools", "pyproject.toml")


def whole_tree(base: str, dest: Path, root: Path = ROOT) -> tuple[Path, str, str]:
    """(tree, label, commit to record) of a whole base tree (``--whole-tree``): a directory
    holding ``WHOLE``, used in place, or a commit of ``root``'s repository, its ``WHOLE``
    written under ``dest``. Refused (ValueError, one line) before any build where a directory
    lacks one of them or git does not know the commit."""
    if Path(base).is_dir():
        tree = Path(base).resolve()
        missing = [n for n in WHOLE if not (tree / n).exists()]
        if missing:
            raise ValueError(f"--base {base} --whole-tree: no {', '.join(missing)} there")
        digest = hashlib.sha256()
        for f in sorted(p for n in WHOLE for p in [tree / n, *(tree / n).rglob("*")]):
            if f.is_file() and "__pycache__" not in f.parts:
                digest.update(f.relative_to(tree).as_posix().encode() + b"\0" + f.read_bytes())
        label = f"{_shown(tree, root)} (tree sha256 {digest.hexdigest()[:16]})"
        return tree, label, f"unknown (a whole-tree A/B base: {label})"
    got = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", f"{base}^{{commit}}"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if got.returncode != 0:
        raise ValueError(
            f"--base {base} --whole-tree: not a commit of this repository; name one, or a "
            "directory holding gift_quant, tools and pyproject.toml"
        )
    sha = got.stdout.strip()
    archive = subprocess.run(
        ["git", "archive", sha, *WHOLE], cwd=root, capture_output=True, timeout=120, check=True
    )
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest, sha, sha


def run_side(side: str, cmd: list[str], cwd: Path, env: dict, limit: float | None) -> None:
    """Run one side's timing, its lines passed through as they come; SystemExit (one line)
    where it fails, or runs past ``limit`` seconds (then stopped), naming the last line it
    printed."""
    t0, last = time.time(), ["(nothing)"]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def relay() -> None:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.strip():
                last[0] = line.strip()

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = None
    proc.wait()
    reader.join(timeout=5)
    if rc is None:
        sys.exit(
            f"ab_kernels: the {side} build's timing ran past --side-limit {limit:g} s and was "
            f"stopped; its last line: {last[0]}"
        )
    if rc != 0:
        sys.exit(
            f"ab_kernels: the {side} build's timing failed (exit {rc}) after "
            f"{time.time() - t0:.0f} s; its last line: {last[0]}"
        )


def _env(tree: Path, **extra: str) -> dict:
    env = dict(os.environ, GIFT_QUANT_TUNE="0", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="a commit, or a directory of kernel sources")
    ap.add_argument(
        "--whole-tree",
        action="store_true",
        help="the base's own gift_quant, tools and pyproject.toml (a layout change)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument(
        "--side-limit",
        type=float,
        default=None,
        help="seconds each side's timing may run before it is stopped (default: no limit)",
    )
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then bench_kernels arguments")
    args = ap.parse_args()
    if args.side_limit is not None and not args.side_limit > 0:
        ap.error(f"--side-limit {args.side_limit:g}: give a positive number of seconds")
    bench = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    own = [a for a in bench if a.split("=")[0] in OWN]
    if own:
        ap.error(f"{', '.join(own)} after --: the A/B sets these itself (use --out before --)")
    with tempfile.TemporaryDirectory(prefix="gq-ab-") as tmp:
        try:  # the base, checked and in place before any build
            if args.whole_tree:
                base, label, base_commit = whole_tree(args.base, Path(tmp) / "base")
            else:
                sources, label = base_sources(args.base)
                base, base_commit = base_tree(sources, Path(tmp) / "base"), None
        except ValueError as exc:
            ap.error(str(exc))
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA GPU here: the A/B builds and times the CUDA kernels on one")
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        # a copy of this tree with the base's kernels has no git history: it records the commit
        # this tree records (its Python is this tree's), and the base among its switches
        sys.path.insert(0, str(ROOT))
        from gift_quant.testing import run_environment

        commit = run_environment(shared=False)["commit"]
        trees = {"base": base, "new": ROOT}
        extra = {
            "base": {"GIFT_QUANT_AB_BASE": label, "GIFT_QUANT_COMMIT": base_commit or commit},
            "new": {},
        }
        envs = {k: _env(trees[k], **extra[k]) for k in trees}
        print(f"building the two libraries side by side (base: {label})", flush=True)
        builds = {
            k: subprocess.Popen([sys.executable, "-c", BUILD], cwd=trees[k], env=envs[k])
            for k in trees
        }
        if any(p.wait() != 0 for p in builds.values()):
            sys.exit("a build failed (see above); nothing timed")
        for k in ("base", "new"):
            (out / f"ab_{k}.json").unlink(missing_ok=True)
            cmd = [sys.executable, str(trees[k] / "tools" / "bench_kernels.py"), "--candidates"]
            cmd += ["--skip-tinygemm", "--out", str(out), "--name", f"ab_{k}.json", *bench]
            print(f"timing the {k} build: {' '.join(cmd[1:])}", flush=True)
            run_side(k, cmd, trees[k], envs[k], args.side_limit)
    sys.path.insert(0, str(ROOT / "tools"))
    from kernel_tables import print_comparison

    what = "the tree" if args.whole_tree else "the kernels"
    print(f"base: {what} of {label}; new: this tree's ({commit})")
    runs = [json.loads((out / f"ab_{k}.json").read_text()) for k in ("base", "new")]
    print_comparison(*runs)


if __name__ == "__main__":
    main()
