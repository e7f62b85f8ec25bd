"""Start-up cost of the command line: wall (and CPU) time of fresh processes, median of repeats.

Rows: ``python -m gift_quant --help``, ``import gift_quant``, a recipe error (``recover --set
quant.bitz=3``), and, side by side in the same run, what ``import gift_quant`` cost when it
imported transformers' quantizer registry eagerly (the same import done explicitly), plus
``import torch`` alone for scale. Prints a table; writes benchmarks/results/cli_start.json.

    python tools/bench_cli_start.py (--shared | --idle) [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import (  # noqa: E402
    add_arguments,
    child_env,
    provenance,
    shared_flag,
    stamp,
    write_json,
)

COMMANDS = {
    "--help": ["-m", "gift_quant", "--help"],
    "import gift_quant": ["-c", "import gift_quant"],
    "recipe error": ["-m", "gift_quant", "recover", "--set", "quant.bitz=3"],
    "eager hook import (before)": ["-c", "import gift_quant.io.transformers_hook"],
    "import torch": ["-c", "import torch"],
}
EXPECTED_RC = {"recipe error": 2}


def time_once(args: list[str], env: dict) -> tuple[float, float, int, str]:
    """Wall seconds, CPU seconds (user + system of the child: less sensitive to other load),
    exit code and stderr of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, p.returncode, p.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cli_start.json"))
    add_arguments(ap)
    args = ap.parse_args()
    prov = provenance(shared_flag(ap, args))
    env = child_env(ROOT, HF_HUB_OFFLINE="1")
    meta = {
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "repeats": args.repeats,
    }
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    cpu: dict[str, list[float]] = {name: [] for name in COMMANDS}
    stderr_lines: dict[str, int] = {}
    for _ in range(args.repeats):  # interleaved, so load changes hit every row alike
        for name, cmd in COMMANDS.items():
            seconds, cpu_s, rc, err = time_once(cmd, env)
            if rc != EXPECTED_RC.get(name, 0):
                raise SystemExit(f"{name}: exit code {rc}\n{err[-2000:]}")
            times[name].append(seconds)
            cpu[name].append(cpu_s)
            stderr_lines[name] = len(err.splitlines())
    base = statistics.median(times["eager hook import (before)"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            stamp(
                {
                    **meta,
                    "command": name,
                    "median_s": med,
                    "min_s": min(ts),
                    "max_s": max(ts),
                    "ratio_to_eager_import": med / base,
                    "median_cpu_s": statistics.median(cpu[name]),
                    "stderr_lines": stderr_lines[name],
                },
                prov,
            )
        )
    head = ("median s", "min s", "max s", "/eager", "cpu s", "stderr")
    print(f"{'command':28s} " + " ".join(f"{h:>9s}" for h in head))
    for r in rows:
        print(
            f"{r['command']:28s} {r['median_s']:9.3f} {r['min_s']:9.3f} {r['max_s']:9.3f} "
            f"{r['ratio_to_eager_import']:9.3f} {r['median_cpu_s']:9.3f} {r['stderr_lines']:9d}"
        )
    print(
        f"({args.repeats} repeats, load average {meta['load_average_1min']:.1f} on "
        f"{meta['cpu_count']} cores, machine {'shared' if prov['shared'] else 'idle'})"
    )
    write_json(args.out, rows)


if __name__ == "__main__":
    main()
