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
    stem: str, depends_on: list[str], command: Callable[[str], list[str]], timeout: int
) -> Path:
    """The cached ``<stem>-<digest>.so``; built by ``command(output_path)`` when missing.
    Raises RuntimeError with the compiler's last line when the build fails."""
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
        done = subprocess.run(command(tmp), capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
