"""The warpgroup-MMA kernel (``kernels/cuda/mixed_wg.cu``, sm_90a): its reading of the packed
words, mirrored on the CPU; on a GPU, its products against the float64 oracle (its launch
rules and routes: test_wg_rules.py).

The CPU mirror repeats the kernel's per-warp bit operations line by line (warp q of a
warpgroup takes the pairs 4 q + u of each k16 step from its word (4 q) / per: at 2 and 4 bits u
= 0, 2 from the low byte of each half and u = 1, 3 from the high byte, each code read where it
lies (fp16 exponent bits that make its bit count 1); at 3 bits by the warp's role in the k16
step (``w3_raw``), the lo column's codes at bit 0 and the hi column's at bit 3; zero-point and
scale from the ring slot's copies of ``pack_zeros`` / ``pack_scales``, one 64-column strip per
warpgroup) and places each weight where the wgmma A-fragment layout puts it; the oracle is the
codes, zero-points and scales the words were packed from.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import stream_k_launch

from gift_quant.kernels.cuda import layout, native, rules
from gift_quant.kernels.triton import routes
from gift_quant.testing import as_bf16, as_fp16, random_cuda_layout

E = 0x64006400


def pos_magic(e: int, bf: bool = False) -> int:
    """fragments.cuh's pos_magic (bf16: pos_magic_bf16), in both halves: 2^(10 - e) in fp16,
    2^(7 - e) in bf16."""
    return (0x4300 - (e << 7) if bf else 0x6400 - (e << 10)) * 0x00010001


def zero_of(z: int, e: int, bf: bool) -> float:
    """mixed_wg.cu's ``zero``: the zero-point as the raw pairs hold a code read at bit e,
    2^(10 - e) + z in fp16 and 2^(7 - e) + z in bf16 (z at bit e of the mantissa)."""
    bits16 = (pos_magic(e, bf) & 0xFFFF) | z << e
    return as_bf16(bits16) if bf else as_fp16(bits16)


def w3_raw(ws: list[int], warp: int, st: int, bf: bool) -> list[int]:
    """3 bits: warp ``warp``'s four raw pairs u = 0..3 of k16 step ``st`` from the step's three
    words (mixed_wg.cu, the 3-bit ``steps``): the warp (st + 3) % 4 reads bits 12..14 of the
    three words and the pair spread over their bit 15; each other warp one word, u = 0, 2 at
    bits 0, 3 and u = 1, 3 at the same bits of the word shifted by 6. Both builds leave the hi
    column's codes (u = 2, 3) at bit 3, over the exponent bits of 2^(10 - 3) in fp16 and of
    2^(7 - 3) in bf16."""
    m, e, e3 = 0x00070007, pos_magic(0, bf), pos_magic(3, bf)
    rest = (st + 3) & 3
    if warp == rest:
        top = ((ws[0] >> 12) & 0x00080008) | ((ws[1] >> 11) & 0x00100010)  # spread_pair_at3
        spread = ((ws[2] >> 10) & 0x00200020) | top | e3
        return [(ws[0] >> 12) & m | e, (ws[1] >> 12) & m | e, (ws[2] >> 9) & m << 3 | e3, spread]
    w = ws[(warp - rest - 1) & 3]
    w6 = w >> 6
    return [w & m | e, w6 & m | e, w & m << 3 | e3, w6 & m << 3 | e3]


def wg_weights(p: layout.Packed, bf: bool = False) -> np.ndarray:
    """The fp16 weights [K, N] the kernel gives the MMA, lane by lane (mixed_wg.cu); with
    ``bf``, what its bf16 build forms before the scale: code - zero (exact in bf16)."""
    K, N, bits, B = p.K, p.N, p.bits, p.N // 64
    per = {4: 4, 2: 8, 3: 5}[bits]
    mask = ((1 << bits) - 1) * 0x00010001
    rlo, rhi, pre = 0, 3, 0  # where the lo and hi columns' codes are read (3 bits: 0 and 3)
    E_bf = 0x43004300  # bf16 at 4 bits: 128 + code, each code moved to bit 0
    qc = p.qc.numpy().astype(np.int64) & 0xFFFFFFFF  # [S, B, bits, 32, 4]
    zp = p.zp.numpy().reshape(-1, B, 64)  # the slot's 64 zero-point bytes [g][j]
    sc = p.scp.view(torch.int16).numpy().reshape(-1, B, 64)  # the slot's 64 scales [t'][j][c]
    W = np.full((K, N), np.nan, dtype=np.float32)
    for ss in range(K // 64):
        grp = ss * 64 // p.group
        for b in range(B):
            for warp in range(4):
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    words = [int(v) for v in qc[ss, b, :, lane, :].reshape(-1)]
                    zb = (
                        int(zp[grp, b, g * 8 + 2 * warp])
                        | int(zp[grp, b, g * 8 + 2 * warp + 1]) << 8
                    )
                    s4 = sc[grp, b, (g >> 1) * 16 + 4 * warp : (g >> 1) * 16 + 4 * warp + 4]
                    # the lo and hi columns' scales
                    scale = [as_fp16(int(s4[g & 1])), as_fp16(int(s4[2 + (g & 1)]))]
                    if bits != 3:  # u = 0, 2 at bits elo, ehi of the word's bytes
                        h = warp & 1 if bits == 2 else 0
                        elo = 0 if bits == 4 else 4 * h
                        ehi = elo + bits
                        # read in place, but bf16: 2 bits at h = 1 after a shift by 2, 4 bits
                        # each moved to bit 0 (read "at 0")
                        pre = 2 * h if bf and bits == 2 else 0
                        rlo, rhi = (0, 0) if bf and bits == 4 else (elo - pre, ehi - pre)
                    zero = [zero_of(zb & 0xFF, rlo, bf), zero_of(zb >> 8, rhi, bf)]
                    for st in range(4):
                        ws = words[st * bits : (st + 1) * bits]
                        raws = w3_raw(ws, warp, st, bf) if bits == 3 else []
                        f = []
                        for u in range(4):
                            if bits != 3:  # the warp's word: u = 0, 2 at elo, ehi; 1, 3 >> 8
                                w = ws[4 * warp // per]
                                if bf and bits == 4:
                                    e = elo if u < 2 else ehi
                                    raw = ((w >> 8 * (u & 1) >> e) & mask) | E_bf
                                else:
                                    e = rlo if u < 2 else rhi
                                    w = w >> pre >> 8 * (u & 1)
                                    raw = (w & (mask << e)) | pos_magic(e, bf)
                            else:
                                raw = raws[u]
                            hi = u >= 2
                            halves = []
                            for half in range(2):
                                if bf:  # code - zero, exact
                                    halves.append(as_bf16(raw >> (16 * half)) - zero[hi])
                                    continue
                                v = np.float16(as_fp16(raw >> (16 * half)) - zero[hi])  # exact
                                halves.append(np.float16(v * scale[hi]))
                            f.append(halves)
                        # A fragment {f0, f2, f1, f3}: a_i holds row g + 8 (i % 2) of the warp's
                        # 16 (strip columns 16 w ..), k 2 t + 8 (i // 2) and its successor
                        for i, fi in enumerate((0, 2, 1, 3)):
                            col = b * 64 + 16 * warp + g + 8 * (i % 2)
                            k = ss * 64 + st * 16 + 2 * t + 8 * (i // 2)
                            W[k, col], W[k + 1, col] = f[fi]
    return W


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [64, 128])
def test_warpgroup_kernel_reads_the_reference_weights(bits: int, group: int) -> None:
    codes, zeros, _, p, ref = random_cuda_layout(256, 128, bits, group, seed=bits * 100 + group)
    assert np.array_equal(wg_weights(p), ref)  # every weight, bit for bit
    # the bf16 build's bit operations: code - zero at every (k, n) (the scale's bf16 rounding
    # is checked on the GPU, against the float64 oracle)
    g_idx = (torch.arange(256) // group).long()
    assert np.array_equal(wg_weights(p, bf=True), (codes - zeros[g_idx]).float().numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [64, -1])
@pytest.mark.parametrize("shape", [(1536, 896), (1024, 1024)], ids=["14strips", "16strips"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_warpgroup_kernel_matches_the_oracle(bits, group, shape, dtype) -> None:
    """mixed_wg.cu at M = 1..520 (partial tiles, several tiles), every configuration the rules
    name plus the most splits at each tile, each that splits K also with its splits summed in
    one cluster, clusters of two tiling four splits (their sums then added by atomics) and
    two splits in a cluster of two (the blocks' exchange of strips);
    37 salient columns (one salient k-step, zeros past the last column), 600 (ten salient
    k-steps: with few K splits, tiles of every height load some inside the main loop, into
    reused ring slots) and none; bias; fp16 and bf16."""
    from gift_quant.kernels import reference
    from gift_quant.kernels.triton import dispatch, ops
    from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle, random_mixed_linear

    if native.library() is None or not native.wg_available():
        pytest.skip("the warpgroup-MMA kernel is not built here (needs nvcc and sm_90a)")
    K, N = shape
    for nsal in (37, 600, 0):
        kw = dict(bits=bits, group_size=group, num_salient=nsal, bias=nsal > 0, device="cuda")
        layer = random_mixed_linear(K, N, dtype=dtype, seed=bits + nsal, **kw)
        p = ops.prepare(layer)
        cuda = ops.cuda_layout(layer)
        for M in (1, 63, 64, 65, 128, 300, 520):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            exact, ref = oracle(x, layer), reference.dequant_matmul(x, layer)
            most = [(nt, wgs, K // 64 // 4) for nt in rules.WG_TILES for wgs in (2, 4)]
            confs = rules.wg_configs(M, N, K) + [c for c in most if c[1] == 2 or c[0] == 64]
            confs = [(*c, 1) for c in confs] + [(*c, c[2]) for c in confs if c[2] > 1]
            # clusters of 2 tiling 4 splits (+ atomics), with and without the producer warp;
            # 3 splits (at K = 1024 they run 6, 6 and 4 k-steps; at 1536, 8 each)
            confs += [(64, 2, 4, 2), (128, 2, 4, 2), (128, 4, 4, 2), (256, 2, 4, 2)]
            confs += [(64, 2, 3, 3), (64, 4, 3, 1), (128, 2, 3, 3)]
            # two splits in a cluster of two (128 and 256 rows: each block sends the other
            # the strip it does not write)
            confs += [(128, 2, 2, 2), (256, 2, 2, 2)]
            for nt, wgs, splits, cl in dict.fromkeys(confs):
                if (N // 64) % wgs:
                    continue
                out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
                args = (x, p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
                dispatch.run_route(routes.wg_name(nt, wgs, splits, cl), *args, out=out, cuda=cuda)
                err, ref_err = kernel_error(out, ref, exact)
                assert err <= ERROR_FACTOR * ref_err + 1e-6, (M, nt, wgs, splits, cl, nsal, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16_and_32_row_tiles_match_the_oracle(bits, dtype) -> None:
    """The 16- and 32-row tiles (wgmma m64n16k16 / m64n32k16), each named, at M around and
    past one tile, one and four K splits, the
    four summed in one cluster too, each with the blocks' own salient gather too (run twice in
    a row, the counters zero after each launch); 37 salient columns and none."""
    from gift_quant.kernels import reference
    from gift_quant.kernels.triton import dispatch, ops
    from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle, random_mixed_linear

    if native.library() is None or not native.wg_available():
        pytest.skip("the warpgroup-MMA kernel is not built here (needs nvcc and sm_90a)")
    K, N = 1024, 1536
    for nsal in (37, 0):
        kw = dict(bits=bits, group_size=128, num_salient=nsal, bias=nsal > 0, device="cuda")
        layer = random_mixed_linear(K, N, dtype=dtype, seed=bits + nsal, **kw)
        p, cuda = ops.prepare(layer), ops.cuda_layout(layer)
        for M in (1, 8, 15, 16, 17, 32, 33):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            exact, ref = oracle(x, layer), reference.dequant_matmul(x, layer)
            for nt, wgs, splits, cl, gather in [
                (t, w, s, c, gat)
                for t in (16, 32)
                for w in (2, 4)
                for s, c in ((1, 1), (4, 1), (4, 4))
                for gat in (False, True)
            ]:
                name = routes.wg_name(nt, wgs, splits, cl, gather=gather)
                for _ in range(2 if gather else 1):  # a count left over fails the second
                    out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
                    args = (x, p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
                    dispatch.run_route(name, *args, out=out, cuda=cuda)
                    err, ref_err = kernel_error(out, ref, exact)
                    assert err <= ERROR_FACTOR * ref_err + 1e-6, (M, name, nsal, err)
                    _, cnt = dispatch.workspace(x.device, 0)
                    torch.cuda.synchronize()
                    assert not cnt.any(), (M, name, nsal, cnt.nonzero().flatten().tolist())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "bits,dtype", [(4, torch.float16), (3, torch.float16), (4, torch.bfloat16)]
)
def test_a_split_tail_matches_the_oracle(bits, dtype) -> None:
    """mixed_wg.cu with a split tail ("wg:NTxWx1tT"): 6144 columns, so that every tile and
    width but 128 x 4 makes more tiles than the device runs at once at M = 520 (256 x 2: 144
    tiles on an H200's 132) and the tiles past the last whole wave run as 2, 3 or 4 K splits,
    added by the atomics beside whole tiles written directly; 37, 600 (salient k-steps spread
    over the tail's splits) and no salient columns; bias; against the float64 oracle."""
    from gift_quant.kernels import reference
    from gift_quant.kernels.triton import dispatch, ops
    from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle, random_mixed_linear

    if native.library() is None or not native.wg_available():
        pytest.skip("the warpgroup-MMA kernel is not built here (needs nvcc and sm_90a)")
    K, N = 1024, 6144
    ran_tail = 0
    for nsal in (37, 600, 0):
        kw = dict(bits=bits, group_size=128, num_salient=nsal, bias=nsal > 0, device="cuda")
        layer = random_mixed_linear(K, N, dtype=dtype, seed=bits + nsal, **kw)
        p = ops.prepare(layer)
        cuda = ops.cuda_layout(layer)
        for M in (300, 520):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            exact, ref = oracle(x, layer), reference.dequant_matmul(x, layer)
            for nt, wgs in [(64, 2), (64, 4), (128, 2), (256, 2)]:
                tiles = -(-M // nt) * (N // 64 // wgs)
                ran_tail += tiles % native.wg_wave_blocks(nt, wgs) > 0
                for tail in (2, 3, 4):
                    out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
                    args = (x, p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
                    name = routes.wg_name(nt, wgs, 1, 1, tail)
                    dispatch.run_route(name, *args, out=out, cuda=cuda)
                    err, ref_err = kernel_error(out, ref, exact)
                    assert err <= ERROR_FACTOR * ref_err + 1e-6, (M, name, nsal, err)
    assert ran_tail > 0  # some launch had tiles past its last whole wave


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "bits,dtype", [(4, torch.float16), (3, torch.float16), (4, torch.bfloat16)]
)
def test_stream_k_matches_the_oracle_and_leaves_the_workspace_zeroed(bits, dtype) -> None:
    """mixed_wg.cu with a stream-K schedule ("wg:NTx2x1s", 128- and 256-row tiles): fewer tiles
    than a wave (so that every tile is shared, some by many blocks of one or two k-steps),
    between one and two waves, and more than two (whole tiles before the shared ones); 37, 200
    and no salient columns; bias; M not a multiple of the tile. Against the float64 oracle;
    two runs give the same bits (the partial tiles are added in block order); the workspace the
    split kernels share is left zeroed (the partial tiles go to a scratch buffer of the
    launch's own, whatever it held before) and so are the counters, as the other kernels need.
    On a 132-block wave (H100, H200) both kinds of schedule run: a lane per row tile (2, 3 or 4
    row tiles, below two waves and past them, 1 to 17 k-steps a block) and one lane of 5 row
    tiles (test_wg_rules.py checks the schedule's arithmetic on the CPU)."""
    from gift_quant.kernels import reference
    from gift_quant.kernels.triton import dispatch, ops
    from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle, random_mixed_linear

    if native.library() is None or not native.wg_available():
        pytest.skip("the warpgroup-MMA kernel is not built here (needs nvcc and sm_90a)")
    shapes = [(300, 1024, 1024), (520, 6144, 512), (520, 16384, 256), (70, 256, 256)]
    shapes += [(300, 256, 256), (300, 7680, 256), (1000, 4096, 512)]
    seen, lanes_seen = set(), set()
    for M, N, K in shapes:
        for nsal in (37, 200, 0):  # 200: more salient k-steps than quantized ones at K = 256
            kw = dict(bits=bits, group_size=128, num_salient=nsal, bias=nsal > 0, device="cuda")
            layer = random_mixed_linear(K, N, dtype=dtype, seed=bits + nsal + N, **kw)
            p, cuda = ops.prepare(layer), ops.cuda_layout(layer)
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            exact, ref = oracle(x, layer), reference.dequant_matmul(x, layer)
            args = (x, p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
            for nt in (128, 256):
                tiles, wave = -(-M // nt) * (N // 128), native.wg_wave_blocks(nt, 2)
                if tiles % wave == 0:
                    continue
                seen.add((nt, min(tiles // wave, 2)))
                lanes = stream_k_launch(M, N, nt, K // 64 + -(-nsal // 64), wave)[3]
                lanes_seen.add(lanes > 1)
                name = routes.wg_name(nt, 2, 1, 1, 1, True)
                outs = []
                for _ in range(2):
                    out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
                    # NaN where the launch's scratch will be (the allocator's freed block of
                    # that size): the partial tiles must not rely on what it held
                    junk = torch.full(
                        (native.wg_stream_floats(nt, 2),), float("nan"), device="cuda"
                    )
                    del junk
                    dispatch.run_route(name, *args, out=out, cuda=cuda)
                    outs.append(out)
                err, ref_err = kernel_error(outs[0], ref, exact)
                assert err <= ERROR_FACTOR * ref_err + 1e-6, (M, N, K, name, nsal, err)
                assert torch.equal(outs[0], outs[1]), (M, N, K, name, nsal)
                ws, cnt = dispatch.workspace(x.device, 0)
                torch.cuda.synchronize()
                assert not ws.any() and not cnt.any(), (M, N, K, name, nsal)
    # on an H200 (132 blocks a wave): less than a wave, one to two, more than two
    assert {w for _, w in seen} == {0, 1, 2}, seen
    if native.wg_wave_blocks(128, 2) == 132:
        assert lanes_seen == {True, False}, lanes_seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits,dtype", [(4, torch.float16), (3, torch.bfloat16)])
def test_blocks_gather_the_salient_columns_and_leave_the_counters_zeroed(bits, dtype) -> None:
    """64-row tiles asked to ("wg:...g") whose blocks are all on the GPU at once gather x's
    salient columns themselves (a slice each, counted in the last two counters; their salient
    k-steps last):
    launches of 16 to 256 blocks, one block per SM or two, clusters, several row tiles, and one
    of more blocks than the device holds at once (the gather launch before it instead); 37 and
    600 salient columns (10 salient k-steps: with 2 splits, some gathered inside the loop).
    Each layer runs three times on different x in a row, each against the float64 oracle, and
    the counters are zero after every launch (a count left over would let the next launch read
    its salient columns before they are gathered)."""
    from gift_quant.kernels import reference
    from gift_quant.kernels.triton import dispatch, ops
    from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle, random_mixed_linear

    if native.library() is None or not native.wg_available():
        pytest.skip("the warpgroup-MMA kernel is not built here (needs nvcc and sm_90a)")
    K, N = 1024, 2048  # 16 k-steps, 32 strips
    wave = native.wg_wave_blocks(64, 2)
    for nsal in (37, 600):
        kw = dict(bits=bits, group_size=128, num_salient=nsal, bias=True, device="cuda")
        layer = random_mixed_linear(K, N, dtype=dtype, seed=bits + nsal, **kw)
        p, cuda = ops.prepare(layer), ops.cuda_layout(layer)
        args = (p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
        # (tile, strips a block, splits, cluster) at M <= 64: 16 blocks; 96 in clusters of 3
        # and alone; 64 in clusters of 2; 256 (two a SM). At M = 320 (5 row tiles) 80 blocks,
        # and 320-1,280, more than a wave of 64 x 2 tiles (264 on an H200) but one
        confs = [(64, 4, 2, 1), (64, 2, 6, 3), (64, 2, 6, 1), (64, 4, 8, 2), (64, 2, 16, 1)]
        for M in (17, 64, 320):
            for nt, wgs, splits, cl in confs:
                blocks = -(-M // nt) * (N // 64 // wgs) * splits
                assert M < 320 or blocks > wave or wgs == 4
                for _ in range(3):
                    x = torch.randn(M, K, device="cuda", dtype=dtype)
                    exact, ref = oracle(x, layer), reference.dequant_matmul(x, layer)
                    out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
                    name = routes.wg_name(nt, wgs, splits, cl, 1, False, True)
                    dispatch.run_route(name, x, *args, out=out, cuda=cuda)
                    err, ref_err = kernel_error(out, ref, exact)
                    assert err <= ERROR_FACTOR * ref_err + 1e-6, (M, name, nsal, err)
                    _, cnt = dispatch.workspace(x.device, 0)
                    torch.cuda.synchronize()
                    assert not cnt.any(), (M, name, nsal, cnt.nonzero().flatten().tolist())


# one process: a launch that never finishes would hang the test run, not fail it
_BOUND_SCRIPT = """
import sys, torch
from functools import partial
from gift_quant.kernels import reference
from gift_quant.kernels.cuda import native
from gift_quant.kernels.triton import dispatch, ops, routes
from gift_quant.testing import ERROR_FACTOR, graph_time_us, kernel_error, oracle
from gift_quant.testing import random_mixed_linear
c = int(sys.argv[1])
assert native.library() is not None and native.wg_available()  # loads the library
bound = native.wg_max_clusters(64, 2, c)
N, K, M = 128 * bound, 64 * 4 * c, 32  # one cluster a column block: as many as the device holds
layer = random_mixed_linear(K, N, bits=4, group_size=128, num_salient=128, bias=True,
                            dtype=torch.float16, seed=c, device="cuda")
p, cuda = ops.prepare(layer), ops.cuda_layout(layer)
x = torch.randn(M, K, device="cuda", dtype=torch.float16)
out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
args = (x, p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
us = {}
for gather in (False, True):  # the gather launch first: its time is what the blocks' should be
    name = routes.wg_name(64, 2, c, c, 1, False, gather)
    run = partial(dispatch.run_route, name, *args, out=out.fill_(float("nan")), cuda=cuda)
    us[gather] = graph_time_us([run] * 64, reps=3)
torch.cuda.synchronize()
err, ref_err = kernel_error(out, reference.dequant_matmul(x, layer), oracle(x, layer))
# a blocks' gather launch far slower than the gather launch's (20 us and more): its blocks
# waited out the bound for clusters not yet placed, and gathered xs themselves
print(f"{name}: {bound} clusters, {us[False]:.2f} us with the gather launch, "
      f"{us[True]:.2f} us with the blocks' gather; error {err:.3g} (reference {ref_err:.3g})")
sys.exit(0 if err <= ERROR_FACTOR * ref_err + 1e-6 else 1)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cluster", [2, 7])
def test_a_blocks_gather_launch_at_the_cluster_bound_finishes(cluster) -> None:
    """A launch whose blocks gather the salient columns themselves, with exactly as many
    clusters as cudaOccupancyMaxActiveClusters says the device holds, replayed 64 times in a
    row in a CUDA graph (each launch dependent on the one before: its clusters placed while
    that one still holds SMs), finishes within the time limit and matches the oracle. Round
    41's A/B runs stopped at such a launch (32 clusters of 7 on an H200) before the wait for
    the other blocks' slices was bounded."""
    import subprocess
    import sys

    if native.library() is None or not native.wg_available():
        pytest.skip("the warpgroup-MMA kernel is not built here (needs nvcc and sm_90a)")
    run = subprocess.run(
        [sys.executable, "-c", _BOUND_SCRIPT, str(cluster)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    print(run.stdout.strip())  # the two times, for the log (`pytest -s`)
