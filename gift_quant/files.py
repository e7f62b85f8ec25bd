"""File modes of what the package writes: exports, run outputs, checkpoints and the cache.

Two writers leave modes other users of a shared export or cache cannot read: safetensors
creates its files 0600, and ``tempfile.mkdtemp`` its directories 0700. Every writer that goes
through a temporary file or directory calls :func:`follow_umask` on it before renaming it into
place, so the result has the modes a plain ``open()`` / ``mkdir()`` gives (0644 files and 0755
directories under the usual umask 022).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["check_new_out", "current_umask", "follow_umask", "write_text_atomic"]


def current_umask() -> int:
    umask = os.umask(0)  # the only way to read it (before Python 3.13's os.getumask)
    os.umask(umask)
    return umask


def follow_umask(root: str | Path) -> None:
    """Give ``root`` -- a file, or a directory and everything under it -- the modes
    ``open()`` and ``mkdir()`` would give it under the current umask."""
    root = Path(root)
    umask = current_umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary sibling and rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_new_out(out: Path) -> None:
    """A directory a command is to create: not there yet, inside a directory that is."""
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out directory or remove it")
    if not out.parent.is_dir():
        raise FileNotFoundError(
            f"the directory --out {out} is to be made in, {out.parent}, does not exist; create "
            f"it first (mkdir -p {out.parent}) or choose another --out"
        )
