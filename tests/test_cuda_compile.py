"""The CUDA kernels' sources compiled where ``nvcc`` is (no GPU needed): each source for sm_90a
as the build compiles it (no stack frame or spill but the known few bytes, no MMA ptxas
serializes), and fragments.cuh's own pair -> slot maps, compiled for the host and run, equal to
the ones ``layout.pack_codes`` packs by."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from gift_quant.kernels.cuda import layout, native


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA compiler")
def test_the_kernels_pair_slots_are_the_layouts(tmp_path) -> None:
    """fragments.cuh's own pair -> slot maps (``pair_slot<BITS>``, compiled for the host and
    run) are the ones ``layout.pack_codes`` packs by, at every bit width and k16 step: the CPU
    mirrors in test_cuda_kernel.py repeat the C++ text, this ties them to the C++ itself."""
    stub = tmp_path / "slots.cu"
    stub.write_text(
        f'#include "{(native.SOURCES[0].parent / "fragments.cuh").as_posix()}"\n'
        "#include <cstdio>\n"
        "template <int B> void show() {\n"
        "  for (int st = 0; st < 4; ++st)\n"
        '    for (int p = 0; p < 16; ++p) std::printf("%d ", pair_slot<B>(st, p));\n'
        '  std::printf("\\n");\n'
        "}\n"
        "int main() { show<2>(); show<3>(); show<4>(); }\n"
    )
    exe = tmp_path / "slots"
    done = subprocess.run(
        ["nvcc", "-std=c++17", "-o", str(exe), str(stub)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True)
    got = [list(map(int, line.split())) for line in run.stdout.splitlines()]
    want = [[s for st in range(4) for s in layout._pair_slots(b, st)] for b in (2, 3, 4)]
    assert got == want


@pytest.mark.skipif(native.find_nvcc() is None, reason="no CUDA compiler")
@pytest.mark.parametrize("source", native.SOURCES, ids=lambda p: p.name)
def test_kernel_compiles_for_sm90(tmp_path, source) -> None:
    from gift_quant.kernels.sass import cuobjdump, main_loops, ptxas_usage, unwaited_operand_writes

    out = tmp_path / "k.cubin"
    # as the build on compute capability 9.0; each bit width, row tile, one block width and
    # depth (wg: all); ptxas's registers, spills and performance advisories per kernel
    done = native.compile_check(native.find_nvcc(), source, out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.stat().st_size > 0
    usage = ptxas_usage(done.stderr)
    # no stack frame (a spill, or a register array indexed at run time: the pair reorders of
    # fragments.cuh index by k16 step, a constant only once the loops over it are unrolled),
    # but the stream-K 256-row warpgroup tiles' few bytes (below)
    frames = {name: u["stack"] for name, u in usage.items() if "stack" in u}
    assert len(frames) >= 12, len(frames)
    for name, frame in frames.items():
        stream_k_256 = source.name == "mixed_wg.cu" and "Li256ELi2ELb1E" in name
        assert frame <= (16 if stream_k_256 else 0), (name, frame)
    if source.name == "mixed_wg.cu":  # warpgroup MMAs with the weights as register operand A
        # no kernel whose MMAs ptxas serializes (C7518: an MMA wait on a path it cannot prove
        # convergent made round 31's first stream-K build wait out every MMA), and no spills
        # but the stream-K 256-row tiles' few bytes (a shared-memory address reloaded per k-step)
        assert "C7518" not in done.stderr, done.stderr[-2000:]
        spills = {name: u["spill_stores"] for name, u in usage.items() if "spill_stores" in u}
        assert len(spills) >= 42, len(spills)
        for name, stored in spills.items():
            stream_k_256 = "Li256ELi2ELb1E" in name
            assert stored <= (16 if stream_k_256 else 0), (name, stored)
        # the kernel whose blocks gather the salient columns (template CO, last) is launched where
        # its plain twin's occupancy queries say every block is on the GPU at once: it must not
        # take more registers than the twin in the units the SM allocates them (8 per thread)
        used = {name: u["registers"] for name, u in usage.items() if "registers" in u}
        co = {name: regs for name, regs in used.items() if "ELb0ELb1EEEv" in name}
        assert len(co) == 36, sorted(co)
        for name, regs in co.items():
            twin = used[name.replace("ELb0ELb1EEEv", "ELb0ELb0EEEv")]
            assert -(-regs // 8) <= -(-twin // 8), (name, regs, twin)

        sass = cuobjdump(out.read_bytes(), "-sass")
        loops, writes = unwaited_operand_writes(sass)
        # 15 configurations (and 6 with a stream-K schedule) x fp16/bf16 x 3 loops; no write to
        # a fragment an MMA may still read
        assert loops >= 126 and writes == 0, (loops, writes)
        # each kernel's MMAs are the main loop's two k-steps x 4 k16 slices, none copied into
        # the 3-bit dequantization's per-warp branches (`.aligned`: every warp of a warpgroup
        # must issue the same MMA instructions): 42 kernels, the 12 of the 64-row tiles whose
        # blocks gather the salient columns themselves (2 tiles x 3 widths x fp16/bf16), and
        # the 16- and 32-row tiles (2 heights x 2 block widths x 3 widths x fp16/bf16), each
        # also with the blocks' gather: 48
        functions = re.split(r"\n\s*Function : ", sass)[1:]
        counts = [len(re.findall(r"\bHGMMA\.", f)) for f in functions]
        assert sorted(c for c in counts if c) == [8] * 102, counts
        # and all 8 lie in the main loop that tools/sass_loops.py counts (its shortest loop
        # holding MMAs and the dequantization: two k-steps, unrolled), in each of the 102
        assert sorted(loop["mma"] for loop in main_loops(sass).values()) == [8] * 102


def test_diagnosis_builds_take_only_the_known_macros(monkeypatch) -> None:
    """``GIFT_QUANT_CUDA_DEFINES`` names diagnosis macros (part of the build's digest, so each
    such build is cached apart); a name the kernels do not know is refused in one line naming
    the known ones, before any build, and each known one appears in the warpgroup kernel."""
    monkeypatch.setenv("GIFT_QUANT_CUDA_DEFINES", "GQ_TRACE,GQ_NO_DEQUANT")
    assert native.build_defines() == ["GQ_TRACE", "GQ_NO_DEQUANT"]
    monkeypatch.setenv("GIFT_QUANT_CUDA_DEFINES", "GQ_TRACE,GQ_NODEQ")
    with pytest.raises(
        ValueError, match=r"unknown macro\(s\) \['GQ_NODEQ'\]; known: GQ_TRACE, "
    ) as e:
        native.build_defines()
    assert "\n" not in str(e.value)
    monkeypatch.delenv("GIFT_QUANT_CUDA_DEFINES")
    assert native.build_defines() == []
    source = (native.HEADER.parent / "mixed_wg.cu").read_text()
    for name in native.DIAGNOSIS_DEFINES:
        assert f"#ifdef {name}" in source, name
