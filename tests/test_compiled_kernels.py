"""The kernels as the GPU compiler builds them, read without a GPU: every Triton kernel compiles
for sm_90 (the interpreter runs any Python, the GPU compiler does not), no compiled MMA loop
writes a register an MMA may still read (``tiles.settle``), and every split-K epilogue zeroes
its workspace only after a barrier (``tiles.store_output``); ``kernels.sass`` reads them.
The compiles run in a subprocess without TRITON_INTERPRET (the kernel modules must be imported
without it)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from gift_quant.kernels import sass


def _compile_for_gpu(bits: int, dtype: str, with_gemv: bool, settle: bool = True) -> list[str]:
    """``testing.compile_for_gpu`` for one bit width and dtype with the ``t128wr`` mm
    configuration (at 16 and 64 rows), in a process without TRITON_INTERPRET (the kernel
    modules must be imported without it): the lines it returns."""
    code = (
        "from gift_quant.testing import compile_for_gpu as c; from gift_quant.kernels.triton "
        f"import mm; print(*c(({bits},), ('{dtype}',), {{'t128wr': mm.MM_CONFIGS['t128wr']}}, "
        f"{with_gemv}, rows=(16, 64), settle={settle}), sep='\\n')"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.splitlines()


def test_kernels_compile_for_the_gpu_without_one():
    """The GPU compiler rejects code the interpreter runs (any Python): compile the mm kernel,
    the backward and the dequantizer (the shared tile, salient dot and epilogue) for sm_90 in
    a process without TRITON_INTERPRET. One bit width, bf16, one mm configuration, no GEMV
    (slow to compile): ``tools/check_kernels.py --compile-only`` does them all.

    And in the compiled code no instruction writes a register that an MMA may still read:
    ``t128wr`` (the tile scaled before its MMAs, so Triton pipelines them across k-steps) went
    round with 3 MMAs pending at round 18, and the next k-step's dequantization wrote registers
    they read (``kernels.sass.unwaited_operand_writes`` counts the writes): a wrong output tile in
    about one call in six on the H200 (``tiles.settle``)."""
    lines = _compile_for_gpu(3, "bf16", with_gemv=False)
    assert len(lines) == 6, lines  # mm at 16 and 64 rows, backward, dequantize x 3 noise kinds
    for line in lines[:2]:  # the split-K epilogue zeroes the workspace after a barrier
        assert line.endswith(", 1 split-K epilogues, 0 zeroing unordered"), line
    for line in lines[2:]:
        assert line.endswith(", 0 writes to operands of MMAs not waited for"), line
    for line in lines:
        assert ", 0 writes to operands of MMAs not waited for" in line, line
    for line in lines[:3]:  # the mm kernel's main and salient loops, the backward's loop
        assert re.search(r", [1-9]\d* MMA loops,", line), line
    # the control: without the settle, the walk finds the writes (it is not blind)
    for line in _compile_for_gpu(3, "bf16", with_gemv=False, settle=False)[:2]:
        assert re.search(r", [1-9]\d* writes to operands of MMAs not waited for", line), line


# The split-K epilogue of t64 (4 bits, fp16, 64 rows) as Triton 3.6 compiled it before round
# 20's barrier: the workspace read in one layout (#blocked1) and zeroed in another (#blocked).
_EPILOGUE = """
%done_69 = tt.atomic_rmw add, acq_rel, gpu, %done, %c1_i32, %true : (!tt.ptr<i32>, i32, i1) -> i32
%out = tt.load %6, %omask_55, %cst_10 cacheModifier = cg : tensor<64x64x!tt.ptr<f32>, #blocked1>
tt.store %12, %13, %omask_55 : tensor<64x64x!tt.ptr<f16>, #blocked1>
tt.store %5, %cst_9, %omask_54 : tensor<64x64x!tt.ptr<f32>, #blocked>
%14 = tt.atomic_rmw exch, relaxed, gpu, %done, %c0_i32, %true : (!tt.ptr<i32>, i32, i1) -> i32
"""


def test_the_workspace_walk_finds_a_zeroing_before_the_barrier():
    """``sass.unordered_workspace_zeroing`` on the epilogue that gave zero output elements on
    the H200 (round 20): one epilogue, unordered; with a barrier after the y store, ordered."""
    assert sass.unordered_workspace_zeroing(_EPILOGUE) == (1, 1)
    fixed = _EPILOGUE.replace("tt.store %5", "gpu.barrier\ntt.store %5")
    assert sass.unordered_workspace_zeroing(fixed) == (1, 0)
    assert sass.unordered_workspace_zeroing(_EPILOGUE.replace("cg", "ca")) == (0, 0)
    # a barrier in a nested region (which may not run) does not order the read
    nested = _EPILOGUE.replace("tt.store %5", "scf.if %c {\ngpu.barrier\n}\ntt.store %5")
    assert sass.unordered_workspace_zeroing(nested) == (1, 1)
    # the whole epilogue inside the last arrival's branch, the barrier in it: ordered
    branch = "scf.if %last {\n" + fixed + "}\n"
    assert sass.unordered_workspace_zeroing(branch) == (1, 0)
    # zeroing by an atomic exchange is a write too; two reads before it are two unordered
    exch = _EPILOGUE.replace(
        "tt.store %5, %cst_9, %omask_54 : tensor<64x64x!tt.ptr<f32>, #blocked>",
        "%z = tt.atomic_rmw exch, relaxed, gpu, %5, %cst_9 : (tensor<64x64x!tt.ptr<f32>>) -> f32",
    )
    assert sass.unordered_workspace_zeroing(exch) == (1, 1)
    two = _EPILOGUE.replace(
        "%out = tt.load", "%o2 = tt.load %7 cacheModifier = cg : !tt.ptr<f32>\n%out = tt.load"
    )
    assert sass.unordered_workspace_zeroing(two) == (2, 2)


def test_the_decode_gemv_compiles_for_the_gpu_with_each_dependent_wait():
    """The M = 1 and M = 4 GEMV (inline PTX) as sm_90 launches them: waiting for the previous
    kernel in the first k-block (within one wave) and before the k-loop (capped, past one
    wave), W4 fp16, compiled for sm_90 without a GPU (the interpreter never takes the
    dependent paths)."""
    lines = [x for x in _compile_for_gpu(4, "fp16", with_gemv=True) if x.startswith("_gemv")]
    assert len(lines) == 3, lines  # M = 4 and M = 1 waiting in the loop, M = 1 capped before
    waits = ["'WAIT_IN_LOOP': True" in x for x in lines]
    assert waits == [True, True, False] and all("'PDL': True" in x for x in lines), lines
    assert "maxnreg 80" in lines[2], lines
    for line in lines:  # its split-K epilogue zeroes the workspace after a barrier
        assert line.endswith(", 1 split-K epilogues, 0 zeroing unordered"), line


# Two functions as cuobjdump prints them: in the first, an outer loop (0x0040-0x0130) around an
# inner one (0x0060-0x00f0) that issues the MMAs; the second has a loop but no MMA.
_SASS = """
        Function : _Z3twoPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0040*/                   S2R R0, SR_TID.X ;
        /*0050*/                   ISETP.GE.AND P0, PT, R0, 0x4, PT ;
        /*0060*/                   LDS R4, [R2] ;
        /*0070*/                   LOP3.LUT R5, R4, 0xf000f, R6, 0xea, !PT ;
        /*0080*/                   HADD2 R5, R5, -R7 ;
        /*0090*/                   R2UR UR4, R8 ;
        /*00a0*/                   HGMMA.64x64x16.F32 R24, R56, gdesc[UR4], R24 ;
        /*00b0*/                   HGMMA.64x64x16.F32 R24, R60, gdesc[UR4], R24, gsb0 ;
        /*00c0*/              @!P0 LOP3.LUT R9, R9, 0x7, RZ, 0xc0, !PT ;
        /*00d0*/                   VIADD R2, R2, 0x1 ;
        /*00e0*/                   ISETP.NE.AND P1, PT, R2, R3, PT ;
        /*00f0*/               @P1 BRA 0x60 ;
        /*0100*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0110*/                   VIADD R0, R0, 0x1 ;
        /*0120*/                   ISETP.NE.AND P2, PT, R0, R10, PT ;
        /*0130*/               @P2 BRA 0x40 ;
        /*0140*/                   EXIT ;
        Function : _Z4nonePf
        /*0000*/                   VIADD R0, R0, 0x1 ;
        /*0010*/                   ISETP.NE.AND P0, PT, R0, R1, PT ;
        /*0020*/               @P0 BRA 0x0 ;
        /*0030*/                   EXIT ;
        Function : _Z5mmaskPf
        /*0000*/                   LDSM.16.M88.4 R8, [R2] ;
        /*0010*/                   HMMA.16816.F32 R12, R4, R8, R12 ;
        /*0020*/               @P0 BRA 0x0 ;
        /*0030*/                   LOP3.LUT R5, R4, 0x70007, R6, 0xea, !PT ;
        /*0040*/                   HFMA2 R5, R5, R7, R9 ;
        /*0050*/                   HMMA.16816.F32 R12, R4, R8, R12 ;
        /*0060*/                   HMMA.16816.F32 R16, R4, R10, R16 ;
        /*0070*/               @P1 BRA 0x30 ;
        /*0080*/                   EXIT ;
"""


def test_main_loop_is_the_shortest_loop_holding_the_mmas():
    """``sass.main_loops`` (what ``tools/sass_loops.py`` tabulates): the inner loop of the
    first function, 10 instructions counted by opcode (a predicated one by its opcode);
    nothing for the function without MMAs; in the third, the loop that dequantizes (HFMA2),
    not the shorter one of MMAs alone (a loop over the salient columns)."""
    loops = sass.main_loops(_SASS)
    assert list(loops) == ["_Z3twoPf", "_Z5mmaskPf"]
    assert loops["_Z5mmaskPf"]["instructions"] == 5 and loops["_Z5mmaskPf"]["mma"] == 2
    assert loops["_Z3twoPf"] == {
        "instructions": 10,
        "mma": 2,
        "ops": {
            "LDS": 1,
            "LOP3": 2,
            "HADD2": 1,
            "R2UR": 1,
            "HGMMA": 2,
            "VIADD": 1,
            "ISETP": 1,
            "BRA": 1,
        },
    }
    # the walk for unwaited operand writes reads the same loops (both hold the MMAs), and no
    # write to R56-R63 (their operand A) in either
    assert sass.unwaited_operand_writes(_SASS) == (2, 0)  # (HMMA loops are not its concern)


def test_ptxas_usage_reads_each_kernels_block():
    """``sass.ptxas_usage`` of a -v report: each kernel's own registers, stack and spills (the
    lines after its name, not the next kernel's); a kernel with no properties line has none."""
    report = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1aPf' for 'sm_90a'
ptxas info    : Function properties for _Z1aPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem
ptxas info    : Compiling entry function '_Z1bPf' for 'sm_90a'
ptxas info    : Used 94 registers, used 1 barriers, 1024 bytes smem
"""
    assert sass.ptxas_usage(report) == {
        "_Z1aPf": {"registers": 168, "stack": 8, "spill_stores": 4},
        "_Z1bPf": {"registers": 94},
    }
