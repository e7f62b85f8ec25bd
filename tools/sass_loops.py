"""Static counts of the CUDA kernels' main loops, without a GPU: each source compiled for sm_90a
as the GPU build compiles it (``-DGQ_COMPILE_CHECK``: every configuration the launches may
take), then per kernel the registers and spills ptxas reports and the shortest loop holding
its tensor-core MMAs (``gift_quant.kernels.sass.main_loops``), by opcode.

    PYTHONPATH=. python tools/sass_loops.py [--source mixed_wg.cu ...] [--match REGEX]
        [--ops R2UR,LDS,LOP3,...] [--compare BASE.json] [--out FILE.json] [--shared | --idle]

A loop's counts are static: every path through it counts (the 3-bit warpgroup kernels hold
one path per warp role), so they say what a change adds or removes, not what a warp issues.
``--compare`` prints each kernel's loop and registers against an earlier run's JSON (another
tree: run this script in each). Needs ``nvcc`` on PATH and the cuobjdump that Triton ships.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import add_arguments, provenance, shared_flag, stamp, write_json  # noqa: E402

from gift_quant.kernels.build import compiler_version  # noqa: E402
from gift_quant.kernels.cuda.native import SOURCES, compile_check, find_nvcc  # noqa: E402
from gift_quant.kernels.sass import cuobjdump, main_loops, ptxas_usage  # noqa: E402

OPS = "R2UR,LDS,LOP3,SHF,HADD2,HMUL2,IMAD,BRA"


def label(mangled: str) -> str:
    """``mixed_wg_kernel<0,4,64,2,0,0>`` from a mangled template kernel name (its integer and
    bool template arguments in order); the name itself where it has none."""
    m = re.search(r"I((?:L[bi]\d+E)+)E", mangled)
    if m is None:
        return mangled
    prefix = mangled[: m.start()]
    for n in range(1, len(prefix)):  # the name is the n characters after its length, n
        name = prefix[-n:]
        if prefix[:-n].endswith(str(n)) and (name[0].isalpha() or name[0] == "_"):
            args = re.findall(r"L[bi](\d+)E", m[1])
            return f"{name}<{','.join(args)}>"
    return mangled


def compile_source(nvcc: str, source: Path, work: Path) -> tuple[str, str]:
    """(ptxas's -v report, the SASS) of ``source`` built for sm_90a with every configuration."""
    cubin = work / (source.stem + ".cubin")
    done = compile_check(nvcc, source, cubin)
    if done.returncode != 0:
        raise SystemExit(f"sass_loops: nvcc failed on {source.name}:\n{done.stderr[-2000:]}")
    sass = cuobjdump(cubin.read_bytes(), "-sass")
    if not sass:
        raise SystemExit("sass_loops: no cuobjdump (it ships with triton: pip install triton)")
    return done.stderr, sass


def kernel_rows(source: Path, ptxas: str, sass: str) -> list[dict]:
    """One row per kernel with a main loop: registers, spill bytes, the loop's counts."""
    usage = ptxas_usage(ptxas)
    rows = []
    for name, loop in main_loops(sass).items():
        used = usage.get(name, {})
        rows.append(
            {
                "source": source.name,
                "kernel": label(name),
                "registers": used.get("registers"),
                "spill_bytes": used.get("spill_stores"),
                **loop,
            }
        )
    return rows


def print_table(rows: list[dict], ops: list[str], base: dict | None) -> None:
    cols = ["kernel", "regs", "loop", "MMA", *ops]
    print("| " + " | ".join(cols) + " |")
    print("|---" * len(cols) + "|")
    for r in rows:
        b = base.get((r["source"], r["kernel"])) if base else None
        now = [r["registers"], r["instructions"], *(r["ops"].get(o, 0) for o in ops)]
        was = [b["registers"], b["instructions"], *(b["ops"].get(o, 0) for o in ops)] if b else now
        cells = [f"{n}" if n == w else f"{w} -> {n}" for n, w in zip(now, was, strict=True)]
        cells = [r["kernel"], *cells[:2], str(r["mma"]), *cells[2:]]
        print("| " + " | ".join(cells) + " |")
    if base:
        gone = sorted(set(base) - {(r["source"], r["kernel"]) for r in rows})
        if gone:
            print(f"in the base run only: {', '.join(k for _, k in gone)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--source",
        action="append",
        choices=[s.name for s in SOURCES],
        help="the source(s) to compile (repeatable; default: all)",
    )
    ap.add_argument("--match", default="", help="only kernels whose label matches this regex")
    ap.add_argument("--ops", default=OPS, help=f"opcode columns of the table (default {OPS})")
    ap.add_argument("--compare", type=Path, help="an earlier run's JSON: print base -> now")
    ap.add_argument("--out", type=Path, help="write the rows here as JSON")
    add_arguments(ap)
    args = ap.parse_args()
    try:
        pattern = re.compile(args.match)
    except re.error as e:
        ap.error(f"--match {args.match!r} is not a regular expression: {e}")
    base = None
    if args.compare is not None:
        try:
            old = json.loads(args.compare.read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--compare {args.compare}: not a JSON file this script wrote ({e})")
        base = {  # what this run compiles and keeps: the others are not "gone"
            (r["source"], r["kernel"]): r
            for r in old
            if (args.source is None or r["source"] in args.source) and pattern.search(r["kernel"])
        }
    nvcc = find_nvcc()
    if nvcc is None:
        ap.error("no nvcc in $CUDA_HOME or on PATH: install the CUDA toolkit (12.8+, for sm_90a)")
    prov = provenance(shared_flag(ap, args))
    release = re.search(r"release [\d.]+, V[\d.]+", compiler_version(nvcc))
    prov["nvcc"] = release[0] if release else None  # the SASS depends on it
    sources = [s for s in SOURCES if args.source is None or s.name in args.source]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for source in sources:
            ptxas, sass = compile_source(nvcc, source, Path(work))
            got = [r for r in kernel_rows(source, ptxas, sass) if pattern.search(r["kernel"])]
            print(f"{source.name}: {len(got)} kernels with a main loop", file=sys.stderr)
            rows += got
    print_table(rows, [o for o in args.ops.split(",") if o], base)
    if args.out is not None:
        write_json(args.out, {"rows": [stamp(r, prov) for r in rows]})


if __name__ == "__main__":
    main()
