"""Summaries of Nsight Compute output for the kernel notes, from ncu's own text and CSV (no GPU
needed to read them):

    ncu --clock-control none --section SpeedOfLight --section LaunchStats --section Occupancy \\
        --section WarpStateStats python3 tools/bench_kernels.py --profile 4096,4096,4,64 > run.txt
    python3 tools/ncu_summary.py details run.txt          # per kernel: medians over its launches

    ncu --clock-control none --set full --warp-sampling-interval 0 --import-source no -k KERNEL \\
        --launch-skip 30 --launch-count 1 -o rep python3 tools/bench_kernels.py --profile SPEC
    ncu -i rep.ncu-rep --page source --print-source sass --csv > sass.csv
    python3 tools/ncu_summary.py sass sass.csv --top 16   # stall samples by reason, by instruction
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import statistics
import sys
from pathlib import Path

METRICS = (
    "Duration",
    "Elapsed Cycles",
    "SM Active Cycles",
    "DRAM Throughput",
    "L2 Cache Throughput",
    "L2 Hit Rate",
    "Achieved Occupancy",
    "Registers Per Thread",
    "Grid Size",
    "Block Size",
    "Warp Cycles Per Issued Instruction",
    "Dynamic Shared Memory Per Block",
)
ALL_SAMPLES = "Warp Stall Sampling (All Samples)"


def details(text: str) -> dict[str, dict[str, tuple[str, float, int]]]:
    """{kernel: {metric: (unit, median over its launches, launches)}} of ncu's details page (the
    metrics of METRICS that it printed). A kernel is named by its function's name, without its
    namespace, template arguments and parameters."""
    launches: dict[str, list[dict[str, tuple[str, float]]]] = {}
    for block in re.split(r"\n  (?=\S)", "\n" + text):
        head = block.split("\n", 1)[0]
        if "Section:" not in block or ", Context " not in head:
            continue
        m = re.match(r"(?:void )?(?:[\w:<>]*::)?(\w+)", head.strip())
        if not m:
            continue
        got = {}
        for name in METRICS:
            line = re.search(rf"\n\s+{re.escape(name)}\s+(\S+\s+)?([\d,.]+)\s*\n", block + "\n")
            if line:
                got[name] = ((line.group(1) or "").strip(), float(line.group(2).replace(",", "")))
        launches.setdefault(m.group(1), []).append(got)
    out = {}
    for kernel, runs in launches.items():
        out[kernel] = {}
        for name in METRICS:
            vals = [r[name] for r in runs if name in r]
            if vals:
                med = statistics.median(v for _, v in vals)
                out[kernel][name] = (vals[0][0], med, len(vals))
    return out


def sass(text: str, top: int = 16) -> dict:
    """Stall samples of ncu's source page (SASS, CSV): their total, the share of each reason
    (``stall_*`` columns, all samples), and the ``top`` instructions by samples with their
    index in the listing, times executed, code (addresses written ADDR) and two main reasons."""
    rows = list(csv.reader(io.StringIO(text)))
    at = next((i for i, r in enumerate(rows) if ALL_SAMPLES in r), None)
    if at is None:
        raise ValueError(f"no {ALL_SAMPLES!r} column: not ncu's --page source --csv output")
    head, data = rows[at], [r for r in rows[at + 1 :] if len(r) == len(rows[at])]
    col = {h: i for i, h in enumerate(head)}
    reasons = [h for h in head if h.startswith("stall_") and "(Not Issued)" not in h]

    def num(row: list[str], name: str) -> float:
        v = row[col[name]].replace(",", "").strip()
        return float(v) if v else 0.0

    total = sum(num(r, ALL_SAMPLES) for r in data)
    if total <= 0:
        raise ValueError("the listing holds no stall samples (was it collected with --set full?)")
    by_reason = {h[6:]: sum(num(r, h) for r in data) / total for h in reasons}
    ranked = sorted(range(len(data)), key=lambda i: -num(data[i], ALL_SAMPLES))[:top]
    rows_out = []
    for i in ranked:
        r = data[i]
        main = sorted(((num(r, h) / total, h[6:]) for h in reasons), reverse=True)[:2]
        rows_out.append(
            {
                "index": i,
                "share": num(r, ALL_SAMPLES) / total,
                "executed": int(num(r, "Instructions Executed"))
                if "Instructions Executed" in col
                else None,
                "code": re.sub(r"0x[0-9a-f]{8,}", "ADDR", r[col["Source"]]).strip(),
                "reasons": [(name, share) for share, name in main if share > 0],
            }
        )
    return {
        "samples": total,
        "instructions": len(data),
        "reasons": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
        "top": rows_out,
    }


def print_details(path: Path) -> None:
    for kernel, metrics in details(path.read_text(errors="replace")).items():
        n = max(c for _, _, c in metrics.values())
        print(f"  {kernel} ({n} launches)")
        for name, (unit, med, _) in metrics.items():
            print(f"    {name:40s} {unit:16s} {med:,.2f}")


def print_sass(path: Path, top: int) -> None:
    got = sass(path.read_text(errors="replace"), top)
    print(f"total samples {got['samples']:.0f}, instructions {got['instructions']}")
    shares = [f"{k} {v * 100:.1f}%" for k, v in list(got["reasons"].items())[:10]]
    print("by reason: " + ", ".join(shares))
    print("top instructions (index, share, times executed, SASS, main reasons):")
    for t in got["top"]:
        why = " ".join(f"{n}={s * 100:.1f}%" for n, s in t["reasons"])
        line = f" {t['index']:5d} {t['share'] * 100:5.1f}% exec={t['executed']!s:>6s}"
        print(f"{line} {t['code'][:58]:58s} {why}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("details", help="ncu's details page (text): medians per kernel")
    d.add_argument("files", nargs="+", type=Path)
    s = sub.add_parser("sass", help="ncu's source page (--print-source sass --csv): stalls")
    s.add_argument("file", type=Path)
    s.add_argument("--top", type=int, default=16)
    args = ap.parse_args(argv)
    paths = args.files if args.what == "details" else [args.file]
    for p in paths:
        if not p.is_file():
            ap.error(f"{p}: no such file (ncu's output saved as text or CSV)")
    if args.what == "details":
        for p in args.files:
            print(f"== {p.name}")
            print_details(p)
        return
    try:
        print_sass(args.file, args.top)
    except ValueError as exc:
        sys.exit(f"ncu_summary: {args.file}: {exc}")


if __name__ == "__main__":
    main()
