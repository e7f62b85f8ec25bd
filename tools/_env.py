"""Provenance of a benchmark row: commit, package versions, hardware, and whether the machine
was shared (told by the caller: ``--shared``)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def environment(shared: bool) -> dict:
    import torch
    import transformers

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    env = {
        # a copy of the tree on another machine may carry a stale .git: the caller's word wins
        "commit": os.environ.get("GIFT_QUANT_COMMIT") or git("rev-parse", "HEAD") or "unknown",
        "dirty": None
        if os.environ.get("GIFT_QUANT_COMMIT")
        else bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "shared_machine": shared,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus"] = torch.cuda.device_count()
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    return env
