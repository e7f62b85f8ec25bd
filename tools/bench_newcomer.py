"""What a newcomer waits for: the README's set-up command (install + the main job on the
embedded default) in a fresh virtual environment, timed per phase.

    python tools/bench_newcomer.py --idle [--work DIR] [--keep-cache]

Reads the first ```bash block under "## Set up" in README.md (so the README and this timing
cannot drift), makes a fresh venv in --work, runs each ``&&``-joined step of the command there
(the package installed from this checkout; the job runs in --work), and prints the seconds of
each step and the total.
``--keep-cache`` keeps the converted SmolLM2 cache; by default a fresh cache directory is used,
so the one-time GGUF conversion is included as a newcomer would see it. JSON:
benchmarks/results/newcomer.json.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import add_arguments, provenance, shared_flag, stamp, write_json  # noqa: E402


def setup_command(readme: str) -> str:
    section = readme.split("## Set up", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [x for x in block.splitlines() if x.strip() and not x.lstrip().startswith("#")]
    return " ".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/gift_quant_newcomer")
    p.add_argument("--keep-cache", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    add_arguments(p)
    args = p.parse_args()
    shared = shared_flag(p, args)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    steps = setup_command((ROOT / "README.md").read_text()).split("&&")
    env = {**os.environ, "PATH": f"{work / 'venv/bin'}{os.pathsep}{os.environ['PATH']}"}
    if not args.keep_cache:
        env["GIFT_QUANT_CACHE"] = str(work / "cache")
    env.pop("PYTHONPATH", None)
    rows = []
    prov = provenance(shared)  # first: a commit name its git contradicts is refused before the run
    t_all = time.perf_counter()
    plan = [f"{sys.executable} -m venv {work / 'venv'}", *(s.strip() for s in steps)]
    for step in plan:
        t0 = time.perf_counter()
        cwd = ROOT if "pip install" in step else work  # the run writes runs/ in --work
        proc = subprocess.run(step, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        rows.append({"step": step, "seconds": seconds, "rc": proc.returncode})
        print(f"{seconds:8.1f} s  rc={proc.returncode}  {step}", flush=True)
        if proc.returncode:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"step failed: {step}")
        if "gift_quant recover" in step:
            tail = [x for x in proc.stdout.splitlines() if x.strip()][-12:]
            print("\n".join(tail))
    total = time.perf_counter() - t_all
    print(f"{total:8.1f} s  total (fresh venv, set-up included)")
    write_json(
        Path(args.out) / "newcomer.json",
        {
            "command": " && ".join(s.strip() for s in steps),
            "total_seconds": total,
            "fresh_cache": not args.keep_cache,
            "rows": [stamp(r, prov) for r in rows],
        },
    )


if __name__ == "__main__":
    main()
