"""Reading compiled GPU code without a GPU: what the kernel checks report about a cubin
(through the cuobjdump that Triton ships) and about Triton's TTGIR.

* :func:`resource_usage`: registers and stack bytes (spills); :func:`ptxas_usage`: the same
  from ptxas's report, per kernel;
* :func:`main_loops`: each kernel's main loop, its instructions by opcode (``tools/sass_loops.py``);
* :func:`unwaited_operand_writes`: writes to registers that a warpgroup MMA may still read as
  its operand A (``tiles.settle``; triton-lang/triton#9433, ptxas before 13.3);
* :func:`unordered_workspace_zeroing`: split-K epilogues that zero the workspace with no
  barrier after reading it (``tiles.store_output``).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

__all__ = [
    "cuobjdump",
    "main_loops",
    "ptxas_usage",
    "resource_usage",
    "unordered_workspace_zeroing",
    "unwaited_operand_writes",
]


def cuobjdump(cubin: bytes, flag: str) -> str:
    """What Triton's bundled cuobjdump prints for a one-kernel cubin with ``flag``; "" where
    it is missing or fails."""
    import triton  # the tool ships with it; imported only when a cubin is read

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.is_file():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            run = subprocess.run(
                [str(tool), flag, f.name], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.SubprocessError):
            return ""
    return run.stdout


def resource_usage(cubin: bytes) -> str:
    """ ", N registers, S bytes of stack" of a one-kernel cubin; "" where cuobjdump says
    nothing."""
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", cuobjdump(cubin, "-res-usage"))
    return f", {m[1]} registers, {m[2]} bytes of stack" if m else ""


def unwaited_operand_writes(sass: str) -> tuple[int, int]:
    """(loops, writes): the loops of a kernel's SASS that issue warpgroup MMAs (a backward
    branch and the code it jumps over, holding an HGMMA), and the writes to a register that an
    MMA may still read as its operand A. Each loop is walked twice in address order: an HGMMA
    adds its four A registers to the open group, one flagged ``gsb0`` closes the group,
    ``WARPGROUP.DEPBAR.LE gsb0, N`` retires the oldest groups until N remain; an instruction of
    the second walk whose destination (first operand) is a register of an unretired group
    counts. A heuristic over straight-line order (branches inside the loop are read through, a
    predicated write counts); an MMA whose operand A it cannot read is an error, not a pass.
    The t128wr tile without ``tiles.settle`` (its loops went round with 3 groups open) has
    54-174 at 2-3 bits, fp16/bf16, 16 and 64 rows; as round 18 launched it (capped at 168
    registers, 2 bits, bf16, 64 rows, no bias) 176; settled, 0."""
    loops = writes = 0
    for function in re.split(r"\n\s*Function : ", sass)[1:]:  # addresses restart in each
        n, w = _unwaited_in_function(function)
        loops, writes = loops + n, writes + w
    return loops, writes


def _written(text: str) -> set[int]:
    """The registers an instruction of SASS writes: its first operand after any predicates,
    as wide as the opcode makes it (a conservative reading: ``HMMA`` as 4 fp32 registers)."""
    op, _, rest = text.partition(" ")
    operands = [o.strip() for o in rest.split(",")]
    while operands and re.fullmatch(r"!?U?P(T|\d+)", operands[0]):
        operands.pop(0)
    first = re.fullmatch(r"R(\d+)(?:\.reuse)?", operands[0]) if operands else None
    if first is None or op.startswith("HGMMA"):
        return set()
    if ".128" in op or op.startswith("HMMA") or (op.startswith("LDSM") and op.endswith(".4")):
        width = 4
    elif ".64" in op or "WIDE" in op or op.startswith("CS2R") or op.startswith("LDSM"):
        width = 2
    else:
        width = 1
    return set(range(int(first[1]), int(first[1]) + width))


def ptxas_usage(report: str) -> dict[str, dict[str, int]]:
    """Per kernel of ptxas's ``-v`` report (``cuda.native.compile_check``'s stderr), what it
    states of "registers", "stack" (frame bytes) and "spill_stores" (bytes)."""
    out: dict[str, dict[str, int]] = {}
    for block in report.split("Compiling entry function '")[1:]:
        name = block.split("'", 1)[0]
        usage = out.setdefault(name, {})
        for field, pattern in (
            ("registers", r"Used (\d+) registers"),
            ("stack", r"(\d+) bytes stack frame"),
            ("spill_stores", r"(\d+) bytes spill stores"),
        ):
            m = re.search(pattern, block)
            if m:
                usage[field] = int(m[1])
    return out


def _code(function: str) -> list[tuple[int, str]]:
    """(address, instruction without its predicate) of each line of one function's SASS."""
    code = []
    for line in function.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?(.*?);", line)
        if m:
            code.append((int(m[1], 16), m[2].strip()))
    return code


def _loops_with(code: list[tuple[int, str]], ops: tuple[str, ...]):
    """The body (instructions in address order) of each loop -- a backward branch and the
    code it jumps over -- that holds an instruction starting with one of ``ops``."""
    for at, text in code:
        m = re.search(r"\bBRA (0x[0-9a-f]+)", text)
        if not m or int(m[1], 16) >= at:
            continue
        body = [t for a, t in code if int(m[1], 16) <= a <= at]
        if any(t.startswith(ops) for t in body):
            yield body


def main_loops(sass: str) -> dict[str, dict]:
    """Per function of a cubin's SASS that has one, its main loop: the shortest loop holding a
    tensor-core MMA (``HGMMA``, ``HMMA``) and the dequantization's packed half arithmetic
    (``HADD2``, ``HFMA2``, ``HMUL2``; a loop over the fp16 salient columns alone has none), or
    failing that the shortest holding an MMA, as {"instructions", "mma", "ops"}: its length,
    its MMAs and its instructions by opcode (the part before the first dot; ``BRA``,
    ``LOP3``...). Static counts of the loop's code, every path through it included (a branch
    that skips part of the body still counts both sides), not what a warp executes."""
    out = {}
    for function in re.split(r"\n\s*Function : ", sass)[1:]:
        name = function.split(None, 1)[0]
        bodies = list(_loops_with(_code(function), ("HGMMA", "HMMA")))
        if not bodies:
            continue
        dequant = [b for b in bodies if any(t.startswith(("HADD2", "HFMA2", "HMUL2")) for t in b)]
        body = min(dequant or bodies, key=len)
        ops: dict[str, int] = {}
        for t in body:
            op = t.split(None, 1)[0].split(".", 1)[0]
            ops[op] = ops.get(op, 0) + 1
        mma = ops.get("HGMMA", 0) + ops.get("HMMA", 0)
        out[name] = {"instructions": len(body), "mma": mma, "ops": ops}
    return out


def _unwaited_in_function(sass: str) -> tuple[int, int]:
    loops = writes = 0
    for body in _loops_with(_code(sass), ("HGMMA",)):
        loops += 1
        groups, group = [], set()
        for walk in range(2):
            for t in body:
                if t.startswith("HGMMA"):
                    a = t.partition(" ")[2].split(",")[1].strip()  # D, A, B, ...
                    reg = re.fullmatch(r"R(\d+)(?:\.reuse)?", a)
                    if reg:
                        group |= set(range(int(reg[1]), int(reg[1]) + 4))
                    elif not a.startswith("gdesc"):  # a format this walk cannot read
                        raise ValueError(f"unreadable operand A of {t!r}")
                    if "gsb0" in t:
                        groups, group = [*groups, group], set()
                elif t.startswith("WARPGROUP.DEPBAR"):
                    del groups[: max(0, len(groups) - int(t.rsplit(",", 1)[1], 16))]
                elif walk:
                    writes += bool(_written(t) & group.union(*groups))
    return loops, writes


def unordered_workspace_zeroing(ttgir: str) -> tuple[int, int]:
    """(split-K epilogues, those unordered) in a kernel's TTGIR. An epilogue is a ``tt.load``
    of fp32 pointers with ``cacheModifier = cg`` (the last arrival reading the workspace); it
    is unordered when an fp32 write after it (a ``tt.store`` or an ``atomic_rmw exch``: the
    re-zeroing) comes before a ``gpu.barrier`` in the same region (a barrier inside a nested
    region, which may not run, does not count). Triton chooses each op's layout over the
    threads: where the load and the store differ, a thread may zero an element before the
    thread that reads it has, and that output element comes out 0 (``tiles.store_output``;
    seen on the H200 at round 20). Reads that are not ``.cg`` loads are not found: callers
    that expect an epilogue require the count to be at least 1."""
    epilogues = unordered = 0
    pending: list[int] = []  # region depth of each read not yet ordered by a barrier
    depth = 0
    for line in ttgir.splitlines():
        if "tt.load" in line and "cacheModifier = cg" in line and "!tt.ptr<f32>" in line:
            epilogues += 1
            pending.append(depth)
        elif "gpu.barrier" in line:
            pending = [d for d in pending if d < depth]  # ordered: reads in this region
        elif pending and "!tt.ptr<f32>" in line and ("tt.store" in line or "exch" in line):
            unordered += len(pending)
            pending = []
        depth += line.count("{") - line.count("}")
        pending = [min(d, depth) for d in pending]  # a region left: its reads stay pending
    return epilogues, unordered
