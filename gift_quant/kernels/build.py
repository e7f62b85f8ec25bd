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
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["cached_build", "compiler_version"]


def compiler_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout


def cached_build(
    stem: str,
    depends_on: list[str],
    command: Callable[[str], list[str]],
    timeout: int,
    parts: Callable[[str], list[list[str]]] | None = None,
) -> Path:
    """The cached ``<stem>-<digest>.so``; built by ``command(output_path)`` when missing, after
    ``parts(scratch_dir)`` (compilations run side by side, each its own process: the
    objects ``command`` links) where given. Raises RuntimeError with the compiler's last line
    when a step fails."""
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
        with tempfile.TemporaryDirectory(prefix=f".{stem}-", dir=target.parent) as scratch:
            if parts is not None:
                _run_side_by_side(parts(scratch), timeout)
            _run_side_by_side([command(tmp)], timeout)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _run_side_by_side(commands: list[list[str]], timeout: int) -> None:
    """Run the commands as concurrent processes; RuntimeError (the first failure's last line
    of stderr) if any fails or ``timeout`` seconds pass, the others stopped."""
    procs = [
        subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            if p.returncode:
                raise RuntimeError(err.strip().splitlines()[-1] if err.strip() else "failed")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
