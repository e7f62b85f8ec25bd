"""Where a benchmark figure came from: recorded in every JSON row the tools write.

A figure means little without the code and the machine that produced it, and a figure from a
machine other jobs were using is not comparable with one from an idle machine. So every tool
that writes JSON:

- takes ``--shared`` or ``--idle`` (or the environment variable ``BENCH_SHARED=1`` / ``0``)
  through :func:`add_arguments` and refuses to start without one (:func:`shared_flag`);
- stamps each row with :func:`provenance` -- commit SHA and whether the work tree had
  uncommitted changes, Python / torch / transformers / triton versions, CPU model, GPU name,
  torch's CPU thread count and the shared flag -- through :func:`stamp`, which keeps the stamp
  a row already has, so rows merged from earlier runs keep their own;
- writes the file with :func:`write_json` (a temporary sibling, then a rename), so an
  interrupted run never leaves half a file.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

__all__ = [
    "ENV",
    "add_arguments",
    "gpu_tag",
    "provenance",
    "shared_flag",
    "stamp",
    "write_json",
]

ENV = "BENCH_SHARED"
ROOT = Path(__file__).resolve().parent.parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--shared`` / ``--idle``: whether other work ran on the machine during the run."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--shared",
        dest="shared",
        action="store_const",
        const=True,
        help=f"the machine was shared with other work (or {ENV}=1)",
    )
    group.add_argument(
        "--idle",
        dest="shared",
        action="store_const",
        const=False,
        help=f"the machine ran nothing else (or {ENV}=0)",
    )


def shared_flag(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """The shared flag from the options, else from the environment; a one-line usage error
    before any work when neither says."""
    if getattr(args, "shared", None) is not None:
        return args.shared
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    parser.error(f"say whether the machine is shared: --shared or --idle (or {ENV}=1 / 0)")
    raise AssertionError  # parser.error exits


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _static() -> dict:
    import torch

    from gift_quant.testing import caller_commit

    status = _git("status", "--porcelain", "--untracked-files=no")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    caller = caller_commit(ROOT)  # GIFT_QUANT_COMMIT, checked against the checkout's git
    return {
        "commit": caller or _git("rev-parse", "HEAD"),
        "dirty": None if caller or status is None else bool(status),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "cpu": _cpu_model(),
        "gpu": gpu,
        "threads": torch.get_num_threads(),
    }


def gpu_tag(name: str | None = None) -> str:
    """A short tag for result file names: the first word of the GPU's name (``name``, else
    CUDA device 0's) that holds a digit, lower-cased: "NVIDIA H100 80GB HBM3" -> "h100",
    "NVIDIA H200" -> "h200", "NVIDIA GeForce RTX 4090" -> "4090"; "cpu" without a GPU. The
    tag is for names only (H100 PCIe and SXM both give "h100"); each row's ``gpu`` field holds
    the full name."""
    if name is None:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    words = [w.lower() for w in re.split(r"[\s_-]+", name) if w and w.upper() != "NVIDIA"]
    if not words:
        return "cpu" if not name.strip() else "gpu"
    tag = next((w for w in words if any(c.isdigit() for c in w)), words[0])
    return re.sub(r"[^a-z0-9]", "", tag) or "gpu"


def provenance(shared: bool) -> dict:
    """The fields every JSON row records (see the module docstring)."""
    return {**_static(), "shared": bool(shared)}


def stamp(row: dict, prov: dict) -> dict:
    """``row`` with ``prov`` under ``"provenance"``, unless the row already has one (a row
    measured by an earlier run keeps the stamp of that run)."""
    row.setdefault("provenance", prov)
    return row


def child_env(root: str | Path, **extra: str) -> dict:
    """The environment for a child process of a tool: this checkout first on PYTHONPATH, then
    whatever the tool's own PYTHONPATH had, so the child imports the same packages the tool
    stamped in its rows (replacing PYTHONPATH would hide packages installed there)."""
    paths = [str(root), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **extra}


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented JSON to a temporary sibling, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | Path):
    """A saved result, plain or gzipped (``FILE.json.gz``: superseded runs are kept so)."""
    raw = Path(path).read_bytes()
    return json.loads(gzip.decompress(raw) if str(path).endswith(".gz") else raw)


if __name__ == "__main__":  # print this machine's stamp
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    json.dump(provenance(shared_flag(p, p.parse_args())), sys.stdout, indent=2)
    print()
