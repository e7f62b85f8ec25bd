"""The CUDA tensor-core kernel's layout (``kernels/cuda``), checked on the CPU.

The kernel itself needs a GPU (``tools/check_kernels.py``, ``tools/sweep_mma.py``); what CI can
check is that the words ``pack_codes`` / ``pack_zeros`` / ``pack_scales`` write, read back with
the kernel's own bit operations (a line-by-line Python mirror of ``unpack_pairs``, ``pair_exp``
and the fp16 arithmetic of ``mixed_mma.cu``), give every weight at its (k, n) exactly: code -
zero for the MMAs when the scale comes after them, with each accumulator column's own scale,
and the torch reference's fp16 weight when it comes before; and that the salient fragments hold
W_S^T where the kernel reads it.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from gift_quant.kernels.cuda import native
from gift_quant.kernels.reference import dequantize_codes

E = 0x64006400


def pair_exp(bits: int, p: int) -> int:  # mixed_mma.cu: pair_exp<BITS>
    if bits == 4:
        return (p % 4) % 2 * 4
    if bits == 2:
        return 2 * (p % 8) if p % 8 < 5 else 2 * (p % 8 - 5)
    return 0 if p == 15 else (3 * (p % 5) if p % 5 < 3 else 3 * (p % 5 - 3))


def lop3(a: int, mask: int, bits: int) -> int:
    return (a & mask) | bits


def unpack_pairs(bits: int, w: list[int]) -> list[int]:  # mixed_mma.cu: unpack_pairs<BITS>
    r = [0] * 16
    if bits == 4:
        for b in range(4):
            hi = w[b] >> 8
            r[4 * b : 4 * b + 4] = [
                lop3(w[b], 0x000F000F, E),
                lop3(w[b], 0x00F000F0, E),
                lop3(hi, 0x000F000F, E),
                lop3(hi, 0x00F000F0, E),
            ]
    elif bits == 2:
        for b in range(2):
            hi = w[b] >> 10
            for i in range(5):
                r[8 * b + i] = lop3(w[b], 0x00030003 << (2 * i), E)
            for i in range(3):
                r[8 * b + 5 + i] = lop3(hi, 0x00030003 << (2 * i), E)
    else:
        for b in range(3):
            hi = w[b] >> 9
            for i in range(3):
                r[5 * b + i] = lop3(w[b], 0x00070007 << (3 * i), E)
            for i in range(2):
                r[5 * b + 3 + i] = lop3(hi, 0x00070007 << (3 * i), E)
        top = ((w[0] >> 15) & 0x00010001) | ((w[1] >> 14) & 0x00020002)
        r[15] = lop3(w[2] >> 13, 0x00040004, top | E)
    return r


def f16(bits16: int) -> np.float16:
    return np.array([bits16 & 0xFFFF], dtype=np.uint16).view(np.float16)[0]


def lane_scales(words: np.ndarray, grp: int, b: int, row: int) -> list[list[np.float16]]:
    """The 8 words of row ``row`` of the scale words [G, B, 4, 8], as (half 0, half 1) pairs."""
    return [[f16(int(w)), f16(int(w) >> 16)] for w in words[grp, b, row]]


def kernel_operands(p: native.Packed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the kernel forms, lane by lane, from the packed words: the exact weights
    code - zero [K, N] (what the MMAs see when the scale comes after them), the scale each
    accumulator column is multiplied by [G, N] (C-fragment read), and the fp16 weights
    (code - zero) * scale [K, N] of the scale-before path (B-fragment read of the scales)."""
    K, N, bits, B = p.K, p.N, p.bits, p.N // 64
    qc = p.qc.numpy().astype(np.int64) & 0xFFFFFFFF  # [S, B, bits, 32, 4]
    zp = p.zp.numpy()  # [G, B, 8 (g), 8 (j)]
    sw = p.scp.view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF  # [G, B, 4 (t), 8 (j)]
    Q = np.full((K, N), np.nan, dtype=np.float32)
    W = np.full((K, N), np.nan, dtype=np.float32)
    S = np.full((K // p.group, N), np.nan, dtype=np.float32)
    for ss in range(K // 64):
        grp = ss * 64 // p.group
        for b in range(B):
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                words = [int(v) for v in qc[ss, b, :, lane, :].reshape(-1)]
                after = lane_scales(sw, grp, b, t)  # columns 8 j + 2 t + c
                before = lane_scales(sw, grp, b, g >> 1)  # half g % 2: column 8 j + g
                for j in range(8):
                    for c in range(2):
                        S[grp, b * 64 + 8 * j + 2 * t + c] = after[j][c]
                for st in range(4):
                    r = unpack_pairs(bits, words[st * bits : (st + 1) * bits])
                    for pr in range(16):
                        j, f = pr >> 1, pr & 1
                        e = pair_exp(bits, pr)
                        z = int(zp[grp, b, g, j])
                        cz = f16(0x8000 | (0x6400 - (e << 10)) | (z << e))
                        inv = f16((15 - e) << 10)
                        for h in range(2):
                            raw = f16(r[pr] >> (16 * h))
                            q = np.float16(np.float32(raw) * np.float32(inv) + np.float32(cz))
                            k = ss * 64 + st * 16 + 8 * f + 2 * t + h
                            Q[k, b * 64 + 8 * j + g] = q
                            W[k, b * 64 + 8 * j + g] = np.float16(q * before[j][g & 1])
    return Q, S, W


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [64, 128])
def test_kernel_reads_the_reference_weights(bits: int, group: int) -> None:
    K, N = 256, 128
    gen = torch.Generator().manual_seed(bits * 1000 + group)
    codes = torch.randint(0, 2**bits, (K, N), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (K // group, N), generator=gen, dtype=torch.int32)
    scales = (torch.rand(K // group, N, generator=gen) * 0.02 + 1e-3).half()
    p = native.pack(codes, zeros, scales, None, None, bits, group)
    g_idx = torch.arange(K, dtype=torch.int32) // group
    ref = dequantize_codes(codes, zeros, scales, g_idx, torch.float16).float().numpy()
    exact, col_scales, weights = kernel_operands(p)
    # scale after the MMA: exact integer weights, each column's own scale
    assert np.array_equal(exact, (codes - zeros[g_idx.long()]).float().numpy())
    assert np.array_equal(col_scales, scales.float().numpy())
    # scale before it: bit for bit the reference (the fma and the mul round as it rounds)
    assert np.array_equal(weights, ref)
    assert torch.equal(native.unpack_codes(p.qc, bits, K, N), codes)


def test_salient_fragments_hold_ws_where_the_kernel_reads_them() -> None:
    k, N = 37, 128  # k not a multiple of 16: zero rows pad the last step
    wst = torch.randn(k, N).half()
    frag = native.pack_salient(wst).view(torch.float16)  # [Q, B, 4, 32, 8 halves]
    padded = torch.cat([wst, torch.zeros(-k % 16, N, dtype=torch.float16)])
    for q in range(frag.shape[0]):
        for b in range(N // 64):
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                for pr in range(16):  # word pr of the lane: vector pr // 4, element pr % 4
                    j, f = pr >> 1, pr & 1
                    for h in range(2):
                        got = frag[q, b, pr // 4, lane, 2 * (pr % 4) + h]
                        want = padded[16 * q + 8 * f + 2 * t + h, 64 * b + 8 * j + g]
                        assert got == want


def test_zero_point_and_scale_layouts() -> None:
    G, N = 3, 128
    scales = torch.rand(G, N).half()
    zeros = torch.randint(0, 16, (G, N), dtype=torch.int32)
    zp = native.pack_zeros(zeros)  # [G, N/64, 8 (g), 8 (j)]
    sc = native.pack_scales(scales)  # [G, N/64, 4 (t), 8 (j), 2 (c)]
    for n in (0, 9, 63, 64, 127):
        b, j, g = n // 64, n % 64 // 8, n % 8
        assert int(zp[1, b, g, j]) == int(zeros[1, n])
        assert sc[1, b, g // 2, j, g % 2] == scales[1, n]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA compiler")
@pytest.mark.parametrize("source", native.SOURCES, ids=lambda p: p.name)
def test_kernel_compiles_for_sm90(tmp_path, source) -> None:
    out = tmp_path / "k.cubin"
    done = subprocess.run(
        [
            "nvcc",
            "-O3",
            "-gencode=arch=compute_90,code=sm_90",
            "-DGQ_COMPILE_CHECK",  # every bit width (and row tile), one block width and depth
            "-cubin",
            "-o",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_layer_forward_takes_the_cuda_kernel_and_matches_the_oracle(bits: int) -> None:
    from gift_quant.kernels import reference
    from gift_quant.kernels.triton import ops, routes
    from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle, random_mixed_linear

    if native.library() is None:
        pytest.skip("the CUDA kernel is not built here (no nvcc)")
    K, N = 1536, 960  # 15 strips (one warp per block), g64, 37 salient columns, bias
    kw = dict(bits=bits, group_size=64, num_salient=37, bias=True, seed=bits, device="cuda")
    bf = random_mixed_linear(K, N, dtype=torch.bfloat16, **kw)
    with torch.no_grad():
        bf(torch.randn(8, K, device="cuda", dtype=torch.bfloat16))
    assert ops.prepare(bf).cuda is None  # bf16 never builds the second layout
    layer = random_mixed_linear(K, N, dtype=torch.float16, **kw)
    for M in (5, 8, 16, 32):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            out = layer(x)  # the first call of a bucket times the candidates, then runs one
        taken = routes.route_in_force(M, N, K, bits, 64, 37, mma=True)
        assert taken in routes.candidates(M, mma=True, N=N, K=K), taken
        err, ref_err = kernel_error(out, reference.dequant_matmul(x, layer), oracle(x, layer))
        assert err <= ERROR_FACTOR * ref_err + 1e-6, (M, err, ref_err)
    assert ops.prepare(layer).cuda is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [64, -1])
@pytest.mark.parametrize("shape", [(1536, 960), (1024, 1024)], ids=["15strips", "16strips"])
def test_swapped_kernel_matches_the_oracle_in_every_configuration(bits, group, shape) -> None:
    """mixed_mmv.cu at M = 1..8: every configuration the rules name at every depth, one and
    several K splits (the last block's finish), one-warp blocks (15 strips) and four-warp
    blocks (16 strips: the per-warp rings, x shared by the block), salient columns
    round-robin over the splits, bias."""
    from gift_quant.kernels import reference
    from gift_quant.kernels.triton import ops, routes
    from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle, random_mixed_linear

    if native.library() is None:
        pytest.skip("the CUDA kernel is not built here (no nvcc)")
    K, N = shape
    kw = dict(bits=bits, group_size=group, num_salient=37, bias=True, seed=bits, device="cuda")
    layer = random_mixed_linear(K, N, dtype=torch.float16, **kw)
    p = ops.prepare(layer)
    cuda = ops.cuda_layout(layer)
    for M in (1, 2, 3, 8):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        confs = native.mmv_configs(M, N, K) + [(1, 1), (1, K // 64)]
        names = [routes.mmv_name(*c, d) for c in confs for d in native.MMV_DEPTHS]
        exact, ref = oracle(x, layer), reference.dequant_matmul(x, layer)
        for name in names:
            out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
            args = (x, p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
            ops.run_route(name, *args, out=out, cuda=cuda)
            err, ref_err = kernel_error(out, ref, exact)
            assert err <= ERROR_FACTOR * ref_err + 1e-6, (M, name, err, ref_err)
