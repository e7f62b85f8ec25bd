"""Build a kernel's shared object once per machine and cache it (the CPU and the CUDA kernel).

The object lives under ``$GIFT_QUANT_CACHE/kernels/<stem>-<digest>.so``, the digest taken over
what the build depends on (source, compiler version, target). It is compiled into a temporary
sibling and renamed into place, so concurrent builders are safe and a failed build leaves
nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["cached_build", "compiler_version"]


def compiler_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout


def cached_build(
    stem: str,
    depends_on: list[str],
    command: Callable[[str, str], list[str]],
    timeout: int,
    parts: Callable[[str], list[list[str]]] | None = None,
) -> Path:
    """The cached ``<stem>-<digest>.so``; built by ``command(output_path, scratch_dir)`` when
    missing, after ``parts(scratch_dir)`` (compilations run side by side, each its own
    process: the objects in scratch_dir that ``command`` links) where given, all within
    ``timeout`` seconds. Raises
    RuntimeError with the compiler's last line when a step fails or time runs out."""
    from gift_quant.assets import cache_dir

    key = hashlib.sha256("\0".join(depends_on).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{stem}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    log.info("building %s (once per machine; cached under %s)", target.name, target.parent)
    try:
        deadline = time.monotonic() + timeout
        with tempfile.TemporaryDirectory(prefix=f".{stem}-", dir=target.parent) as scratch:
            if parts is not None:
                _run_side_by_side(parts(scratch), deadline)
            _run_side_by_side([command(tmp, scratch)], deadline)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _run_side_by_side(commands: list[list[str]], deadline: float) -> None:
    """Run the commands as concurrent processes, each in its own process group; RuntimeError
    (a failing command's last line of stderr) as soon as one fails or once the ``deadline``
    (time.monotonic) passes, every group still running killed, its children (the compiler's
    own stages) with it."""
    with tempfile.TemporaryFile("w+") as log:
        procs = [
            subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
            for c in commands
        ]
        try:
            while None in (codes := [p.poll() for p in procs]):
                if any(codes):  # one failed: the others are stopped below
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{Path(commands[0][0]).name} ran past the time allowed")
                time.sleep(0.05)
            if any(p.returncode for p in procs):
                log.seek(0)
                lines = log.read().strip().splitlines()
                raise RuntimeError(lines[-1] if lines else "failed")
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
