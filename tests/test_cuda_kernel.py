"""The CUDA tensor-core kernel's layout (``kernels/cuda``), checked on the CPU.

The kernel itself needs a GPU (``tools/check_kernels.py``, ``tools/sweep_mma.py``); what CI can
check is that the words ``pack_codes`` / ``pack_zeros`` / ``pack_scales`` write, read back with
the kernel's own bit operations (a line-by-line Python mirror of ``unpack_pairs``,
``slots_to_pairs``, ``pair_exp`` and the fp16 arithmetic of ``mixed_mma.cu``), give every
weight at its (k, n) exactly: code - zero for the MMAs when the scale comes after them, with
each accumulator column's own scale, and the torch reference's fp16 weight when it comes
before; and that the salient fragments hold W_S^T where the kernel reads it.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from gift_quant.kernels.cuda import layout, native, rules
from gift_quant.testing import as_bf16, as_fp16, random_cuda_layout

E = 0x64006400


def slot_exp(bits: int, s: int) -> int:  # fragments.cuh: slot_exp<BITS>
    if bits == 4:
        return (s % 4) % 2 * 4
    if bits == 2:
        return 2 * (s % 8) if s % 8 < 5 else 2 * (s % 8 - 5)
    return 3 if s >= 14 else 0 if s % 5 == 4 else (s % 5) % 2 * 3


def pair_exp(bits: int, p: int) -> int:  # fragments.cuh: pair_exp<BITS>
    return slot_exp(bits, pair_slot(bits, 0, p))


def w3_rest(st: int) -> int:  # fragments.cuh: w3_rest
    return (st + 3) & 3


def pair_slot(bits: int, st: int, p: int) -> int:  # fragments.cuh: pair_slot<BITS>
    if bits == 4:
        return (p & ~3) + (p & 1) * 2 + ((p >> 1) & 1)
    if bits == 2:
        return (p & ~7) + (p & 1) * 4 + ((p >> 2) & 1) * 2 + ((p >> 1) & 1)
    q, u, rest = p >> 2, p & 3, w3_rest(st)
    if q == rest:
        return 15 if u == 3 else 5 * u + 4
    return 5 * ((q - rest - 1) & 3) + (u & 1) * 2 + (u >> 1)


def slots_to_pairs(bits: int, r: list[int], st: int) -> list[int]:  # fragments.cuh
    return [r[pair_slot(bits, st, p)] for p in range(16)]


def lop3(a: int, mask: int, bits: int) -> int:
    return (a & mask) | bits


def unpack_pairs(bits: int, w: list[int]) -> list[int]:  # fragments.cuh: unpack_pairs<BITS>
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
        r = unpack_pairs_3(w, E, E)
    return r


def unpack_pairs_3(w: list[int], e0: int, e3: int) -> list[int]:  # fragments.cuh: unpack_pairs_3
    """3 bits: each code read where it lies, over ``e0`` (a slot at exponent 0) or ``e3``."""
    r = [0] * 16
    for b in range(3):
        w6 = w[b] >> 6
        r[5 * b + 0] = lop3(w[b], 0x00070007, e0)
        r[5 * b + 1] = lop3(w[b], 0x00380038, e3)
        r[5 * b + 2] = lop3(w6, 0x00070007, e0)
        r[5 * b + 3] = lop3(w6, 0x00380038, e3)
    r[4] = lop3(w[0] >> 12, 0x00070007, e0)
    r[9] = lop3(w[1] >> 12, 0x00070007, e0)
    r[14] = lop3(w[2] >> 9, 0x00380038, e3)
    top = ((w[0] >> 12) & 0x00080008) | ((w[1] >> 11) & 0x00100010)  # spread_pair_at3
    r[15] = lop3(w[2] >> 10, 0x00200020, top | e3)
    return r


def unpack_pairs_low(bits: int, w: list[int]) -> list[int]:  # fragments.cuh: unpack_pairs_low
    """bf16, 2 and 4 bits: each pair's codes moved to bits 0.. of its halves, over 0x4300
    (128.0)."""
    per = {4: 4, 2: 8}[bits]
    mask = ((1 << bits) - 1) * 0x00010001
    return [lop3(w[p // per] >> (p % per * bits), mask, 0x43004300) for p in range(16)]


def unpack_pairs_bf16_3(w: list[int]) -> list[int]:  # fragments.cuh: unpack_pairs_bf16_3
    """bf16, 3 bits: each code read where unpack_pairs reads it, over the bf16 exponent bits
    of 2^(7 - e) for its slot's exponent e (0x4300 at 0, 0x4180 at 3)."""
    return unpack_pairs_3(w, 0x43004300, 0x41804180)


def lane_scales(words: np.ndarray, grp: int, b: int, row: int) -> list[list[np.float16]]:
    """The 8 words of row ``row`` of the scale words [G, B, 4, 8], as (half 0, half 1) pairs."""
    return [[as_fp16(int(w)), as_fp16(int(w) >> 16)] for w in words[grp, b, row]]


def kernel_operands(p: layout.Packed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
                    r = slots_to_pairs(bits, r, st)
                    for pr in range(16):
                        j, f = pr >> 1, pr & 1
                        e = pair_exp(bits, pr)
                        z = int(zp[grp, b, g, j])
                        cz = as_fp16(0x8000 | (0x6400 - (e << 10)) | (z << e))
                        inv = as_fp16((15 - e) << 10)
                        for h in range(2):
                            raw = as_fp16(r[pr] >> (16 * h))
                            q = np.float16(np.float32(raw) * np.float32(inv) + np.float32(cz))
                            k = ss * 64 + st * 16 + 8 * f + 2 * t + h
                            Q[k, b * 64 + 8 * j + g] = q
                            W[k, b * 64 + 8 * j + g] = np.float16(q * before[j][g & 1])
    return Q, S, W


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bf16_kernels_read_code_minus_zero_where_the_layout_puts_it(bits) -> None:
    """bf16 builds: the words ``pack_codes`` writes, read with the bf16 bit operations (a
    mirror of ``unpack_pairs_low``, or at 3 bits ``unpack_pairs_bf16_3``, then one subtraction
    of the zero-point over the same exponent bits, 128 + zero or 2^(7 - e) + zero, exact in
    bf16's 8 significant bits), give code - zero at every (k, n). (That the kernels then round
    as the torch reference does is checked on the GPU, against the float64 oracle.)"""
    K, N, group = 128, 128, 64
    codes, zeros, scales, p, _ = random_cuda_layout(K, N, bits, group, seed=bits)
    assert all(as_bf16(0x4300 | z) == 128 + z for z in range(128))  # exact: 8 significant bits
    qc = p.qc.numpy().astype(np.int64) & 0xFFFFFFFF
    zp = p.zp.numpy()
    Q = np.full((K, N), np.nan)
    for ss in range(K // 64):
        for b in range(N // 64):
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                words = [int(v) for v in qc[ss, b, :, lane, :].reshape(-1)]
                for st in range(4):
                    ws = words[st * bits : (st + 1) * bits]
                    r = unpack_pairs_bf16_3(ws) if bits == 3 else unpack_pairs_low(bits, ws)
                    r = slots_to_pairs(bits, r, st)
                    for pr in range(16):
                        j, f = pr >> 1, pr & 1
                        z = int(zp[ss * 64 // group, b, g, j])
                        e = pair_exp(bits, pr) if bits == 3 else 0  # zero_pairs<true, BITS>
                        zero = as_bf16((0x4300 - (e << 7)) | (z << e))
                        for h in range(2):
                            k = ss * 64 + st * 16 + 8 * f + 2 * t + h
                            got = as_bf16(r[pr] >> (16 * h)) - zero
                            Q[k, b * 64 + 8 * j + g] = got
    g_idx = (torch.arange(K) // group).long()
    assert np.array_equal(Q, (codes - zeros[g_idx]).double().numpy())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [64, 128])
def test_kernel_reads_the_reference_weights(bits: int, group: int) -> None:
    K, N = 256, 128
    codes, zeros, scales, p, ref = random_cuda_layout(K, N, bits, group, seed=bits * 1000 + group)
    g_idx = torch.arange(K) // group
    exact, col_scales, weights = kernel_operands(p)
    # scale after the MMA: exact integer weights, each column's own scale
    assert np.array_equal(exact, (codes - zeros[g_idx.long()]).float().numpy())
    assert np.array_equal(col_scales, scales.float().numpy())
    # scale before it: bit for bit the reference (the fma and the mul round as it rounds)
    assert np.array_equal(weights, ref)
    assert torch.equal(layout.unpack_codes(p.qc, bits, K, N), codes)


def test_salient_fragments_hold_ws_where_the_kernel_reads_them() -> None:
    k, N = 37, 128  # k not a multiple of 16: zero rows pad the last step
    wst = torch.randn(k, N).half()
    frag = layout.pack_salient(wst).view(torch.float16)  # [Q, B, 4, 32, 8 halves]
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
    zp = layout.pack_zeros(zeros)  # [G, N/64, 8 (g), 8 (j)]
    sc = layout.pack_scales(scales)  # [G, N/64, 4 (t), 8 (j), 2 (c)]
    for n in (0, 9, 63, 64, 127):
        b, j, g = n // 64, n % 64 // 8, n % 8
        assert int(zp[1, b, g, j]) == int(zeros[1, n])
        assert sc[1, b, g // 2, j, g % 2] == scales[1, n]


def test_salient_fragments_convert_once_to_bf16_and_launches_refuse_other_types() -> None:
    """bf16 launches read the fp16 fragments converted once per layer (element by element: the
    same layout) and kept; bf16 fragments never convert back, and a launch whose bias, output
    or fragments differ from x's type, or whose output is not a contiguous, 16-byte aligned
    M x N tensor (the kernels write y in 16-byte rows), is refused before anything runs."""
    K, N = 128, 64
    wst = torch.randn(20, N).half()
    p = layout.pack(
        torch.zeros(K, N, dtype=torch.int32),
        torch.zeros(1, N, dtype=torch.int32),
        torch.ones(1, N).half(),
        wst,
        torch.arange(20),
        4,
        128,
    )
    bf = p.salient_as(torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, p.wsp.to(torch.bfloat16))
    assert p.salient_as(torch.bfloat16) is bf  # kept
    assert p.salient_as(torch.float16) is p.wsp
    assert p.for_type(torch.bfloat16).wsp is bf and p.for_type(torch.float16) is p
    q = layout.Packed(p.qc, p.zp, p.scp, bf, p.sidx, p.nsal, 4, 128, K, N)
    with pytest.raises(ValueError, match="only float16 ones convert"):
        q.salient_as(torch.float16)

    def never(*args):  # the library entry: must not be reached
        raise AssertionError("launched")

    never.__name__ = "gq_mixed_mma"
    ws, cnt = torch.zeros(N), torch.zeros(4, dtype=torch.int32)
    x = torch.randn(2, K, dtype=torch.bfloat16)
    for bad in (
        dict(p=p),  # fp16 fragments, bf16 x
        dict(p=q, bias=torch.zeros(N).half()),
        dict(p=q, out=torch.empty(2, N).half()),
        dict(p=q, x=x.float()),
    ):
        args = dict(x=x, p=q, bias=None, out=None) | bad
        with pytest.raises(ValueError, match="gq_mixed_mma"):
            native._launch(never, args["x"], args["p"], args["bias"], ws, cnt, args["out"], 1, 1)
    for out in (
        torch.empty(3, N, dtype=torch.bfloat16),  # M x N is 2 x 64
        torch.empty(N, 2, dtype=torch.bfloat16).t(),  # not contiguous
        torch.empty(2 * N + 1, dtype=torch.bfloat16)[1:].view(2, N),  # 2 bytes off
        torch.empty(2, N, dtype=torch.bfloat16, device="meta"),  # not on x's device
    ):
        with pytest.raises(ValueError, match="gq_mixed_mma: out must be a contiguous, 16-byte"):
            native._launch(never, x, q, None, ws, cnt, out, 1, 1)


def test_entry_points_are_called_with_their_declared_arguments() -> None:
    """The ctypes argument types native.py gives each library entry match its ``extern "C"``
    declaration in the sources, parameter by parameter (a pointer for every ``T*``, a C int
    for every ``int``): a parameter added to one and not the other would shift the rest."""
    import ctypes

    declared = {}
    for source in native.SOURCES:
        for name, params in re.findall(r'extern "C" int (\w+)\(([^)]*)\)', source.read_text()):
            kinds = []
            for param in params.split(","):
                words = param.replace("*", " * ").split()
                assert words[-2:-1] == ["*"] or words[:-1] == ["int"], (name, param)
                kinds.append(ctypes.c_void_p if "*" in words else ctypes.c_int)
            declared[name] = kinds
    assert declared == native.ENTRY_ARGS | native.TRACE_ARGS


def test_the_schedule_bits_are_the_kernels() -> None:
    """native.py's bits of gq_mixed_wg's ``schedule`` argument are the values mixed_wg.cu
    tests them against: a bit that differed would launch stream-K for the blocks' gather."""
    source = native.SOURCES[2].read_text()
    assert native.SOURCES[2].name == "mixed_wg.cu"
    found = re.search(r"constexpr int WG_STREAM_K = (\d+), WG_BLOCKS_GATHER = (\d+);", source)
    assert found is not None
    assert (int(found[1]), int(found[2])) == (native.WG_STREAM_K, native.WG_BLOCKS_GATHER)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_layer_forward_takes_the_cuda_kernel_and_matches_the_oracle(bits: int) -> None:
    from gift_quant.kernels import reference
    from gift_quant.kernels.triton import ops, routes, tuning
    from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle, random_mixed_linear

    if native.library() is None:
        pytest.skip("the CUDA kernel is not built here (no nvcc)")
    K, N = 1536, 960  # 15 strips (one warp per block), g64, 37 salient columns, bias
    kw = dict(bits=bits, group_size=64, num_salient=37, bias=True, seed=bits, device="cuda")
    bf = random_mixed_linear(K, N, dtype=torch.bfloat16, **kw)
    bf(torch.randn(8, K, device="cuda", dtype=torch.bfloat16))  # autograd on, as in training
    assert ops.prepare(bf).cuda is None  # bf16 training never builds the second layout
    fp = random_mixed_linear(K, N, dtype=torch.float16, **kw)
    for layer in (fp, bf):  # bf16 without autograd (inference) builds it
        dtype = torch.float16 if layer is fp else torch.bfloat16
        for M in (5, 8, 16, 32):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            with torch.no_grad():
                out = layer(x)  # the first call of a bucket times the candidates, runs one
            taken = routes.route_in_force(M, N, K, bits, 64, 37, mma=True, dtype=dtype)
            wg = native.wg_available()
            assert taken in routes.candidates(M, mma=True, N=N, K=K, wg=wg), taken
            # measured under this dtype's own key (the CUDA kernels' builds among the timed)
            key = tuning.key(0, N, K, bits, 64, 37, M, dtype, True)
            assert tuning.kept(key) == taken, (M, dtype, taken)
            exact = oracle(x, layer)
            err, ref_err = kernel_error(out, reference.dequant_matmul(x, layer), exact)
            assert err <= ERROR_FACTOR * ref_err + 1e-6, (M, dtype, err, ref_err)
        assert ops.prepare(layer).cuda is not None


def layer_and_layouts(
    K: int, N: int, bits: int, group: int, dtype=torch.float16, num_salient: int = 37
):
    """A mixed layer in ``dtype`` (``num_salient`` salient columns, bias) on the GPU, its
    Triton-side ``prepare`` and its CUDA kernels' layout."""
    from gift_quant.kernels.triton import ops
    from gift_quant.testing import random_mixed_linear

    kw = dict(bits=bits, group_size=group, num_salient=num_salient, bias=True, seed=bits)
    layer = random_mixed_linear(K, N, dtype=dtype, device="cuda", **kw)
    return layer, ops.prepare(layer), ops.cuda_layout(layer)


def assert_routes_match_the_oracle(names, x, layer, p, cuda) -> None:
    """Every kernel in ``names`` on x, written into a NaN-filled output, within ERROR_FACTOR of
    the torch reference's own error against the float64 oracle."""
    from gift_quant.kernels import reference
    from gift_quant.kernels.triton import dispatch
    from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle

    M, N = x.shape[0], layer.out_features
    exact, ref = oracle(x, layer), reference.dequant_matmul(x, layer)
    args = (x, p.q, p.sz, p.wst, p.sidx, p.sal_pos, layer.bias, p.bits, p.group)
    for name in names:
        out = torch.full((M, N), float("nan"), device=x.device, dtype=x.dtype)
        dispatch.run_route(name, *args, out=out, cuda=cuda)
        err, ref_err = kernel_error(out, ref, exact)
        assert err <= ERROR_FACTOR * ref_err + 1e-6, (M, name, err, ref_err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [64, -1])
@pytest.mark.parametrize("shape", [(1536, 960), (1024, 1024)], ids=["15strips", "16strips"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_swapped_kernel_matches_the_oracle_in_every_configuration(bits, group, shape, dtype):
    """mixed_mmv.cu at M = 1..16 (one and two 8-row tiles of x): every configuration the rules
    name at every depth, one and several K splits (the last block's finish), one-warp blocks
    (15 strips) and four-warp blocks (16 strips: the per-warp rings, x shared by the block),
    salient columns round-robin over the splits, bias; on sm_90, the splits summed in
    thread-block clusters of 2-16 blocks; fp16 and bf16."""
    from gift_quant.kernels.triton import routes

    if native.library() is None:
        pytest.skip("the CUDA kernel is not built here (no nvcc)")
    K, N = shape
    layer, p, cuda = layer_and_layouts(K, N, bits, group, dtype)
    for M in (1, 2, 3, 8, 9, 16):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        confs = rules.mmv_configs(M, N, K) + [(1, 1), (1, K // 64)]
        names = [routes.mmv_name(*c, d) for c in confs for d in rules.MMV_DEPTHS]
        if torch.cuda.get_device_capability()[0] >= 9:  # splits summed in clusters: one
            # cluster holding every split (the output written there) and several (added up
            # across clusters by the finish)
            runs = {(wn, rules._runs(K, sp)) for wn, sp in confs}
            names += [
                routes.mmv_name(wn, sp, rules.MMV_DEPTH, c)
                for wn, sp in sorted(runs)
                for c in (2, 4, 8, 16)
                if sp % c == 0
            ]
        assert_routes_match_the_oracle(names, x, layer, p, cuda)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [64, -1])
@pytest.mark.parametrize("shape", [(1536, 960), (1024, 1024)], ids=["15strips", "16strips"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_tensor_core_kernel_sums_its_splits_in_clusters(bits, group, shape, dtype) -> None:
    """mixed_mma.cu with its K splits summed by the last block (no cluster) and in
    thread-block clusters (sm_90): one cluster holding every split (bias added there) and
    several (added across clusters by the finish), clusters of 2-16 blocks, 1/2/4-warp blocks,
    at 16, 32 and 64 staged rows (M = 5..64: the scale after the MMA and on the weights), with
    the salient columns round-robin over the splits; fp16 and bf16."""
    from gift_quant.kernels.triton import routes

    if native.library() is None:
        pytest.skip("the CUDA kernel is not built here (no nvcc)")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    K, N = shape
    layer, p, cuda = layer_and_layouts(K, N, bits, group, dtype)
    widths = [wn for wn in (1, 2, 4) if (N // 64) % wn == 0]
    runs = sorted({rules._runs(K, sp) for sp in (1, 2, 4, 8, 16, K // 64)})
    for M in (5, 16, 17, 32, 33, 64):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        # every cluster size dividing the splits covers the configurations
        # rules.mma_cluster_configs offers on these shapes (16 splits of 1024 columns, 8 of both)
        names = [
            routes.mma_name(wn, sp, c)
            for wn in widths
            for sp in runs
            for c in (1, 2, 4, 8, 16)
            if sp % c == 0
        ]
        assert_routes_match_the_oracle(names, x, layer, p, cuda)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [64, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_tensor_core_kernel_with_warps_sharing_a_strip(bits, group, dtype) -> None:
    """mixed_mma.cu with KW warps on each strip (every built (strips, KW) pair), each a share
    of its block's k-steps and salient steps, added in shared memory: with one split (y
    written by the block), several (the atomics and the last block's finish) and, on sm_90,
    one cluster or several; warps left without a k-step (24 k-steps, 8 warps a strip, 4 or 24
    splits); M = 1..16, where it is built. Past M = 16 the launch is refused."""
    from gift_quant.kernels.triton import dispatch, routes

    if native.library() is None:
        pytest.skip("the CUDA kernel is not built here (no nvcc)")
    K, N = 1536, 1024  # 24 k-steps, 16 strips
    layer, p, cuda = layer_and_layouts(K, N, bits, group, dtype)
    clusters = (1, 2, 4) if torch.cuda.get_device_capability()[0] >= 9 else (1,)
    names = [
        routes.mma_name(wn, sp, c, kw)
        for kw, widths in rules.MMA_KW.items()
        for wn in widths
        for sp in (1, 2, 3, 4, 24)
        for c in clusters
        if sp % c == 0
    ]
    for M in (1, 5, 8, 16):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        assert_routes_match_the_oracle(names, x, layer, p, cuda)
    x = torch.randn(17, K, device="cuda", dtype=dtype)
    ws, cnt = dispatch.workspace(x.device, 17 * N)
    with pytest.raises(ValueError, match="warps per strip"):
        native.mixed_mma(x, cuda.for_type(dtype), None, ws, cnt, 1, 4, kw=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_many_salient_columns_in_one_split_or_sixteen(bits, dtype) -> None:
    """The tensor-core and swapped kernels with 600 salient columns on K = 1024 (38 salient
    k16 steps: all of them in one split's blocks, or 2-3 in each of 16), and none; every block
    width, warps sharing a strip, M = 1..64 (tensor-core) and 1..16 (swapped), against the
    oracle."""
    from gift_quant.kernels.triton import routes

    if native.library() is None:
        pytest.skip("the CUDA kernel is not built here (no nvcc)")
    K, N = 1024, 1024
    for nsal in (600, 0):
        layer, p, cuda = layer_and_layouts(K, N, bits, 128, dtype, num_salient=nsal)
        for M in (1, 8, 16, 32, 64):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            names = [routes.mma_name(wn, sp) for wn in (1, 2, 4) for sp in (1, 16)]
            if M <= 16:
                names += [routes.mmv_name(wn, sp) for wn in (1, 4) for sp in (1, 16)]
                names += [routes.mma_name(wn, sp, 1, 2) for wn in (1, 2) for sp in (1, 16)]
            assert_routes_match_the_oracle(names, x, layer, p, cuda)


def ptx_mma_m16n8k16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """D = A @ B of ``mma.sync.m16n8k16`` from per-lane fragments laid out as the PTX ISA
    defines them: a [32 lanes, 4 registers, 2 halves], b [32, 2, 2] -> d [32, 4] (fp32
    registers). Lane 4 g + t: A register r holds row g + 8 (r & 1), columns 2 t + 8 (r >> 1)
    (+1); B register r holds rows 2 t + 8 r (+1) of column g; D register r is row
    g + 8 (r >> 1), column 2 t + (r & 1)."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for h in range(2):
            for r in range(4):
                A[g + 8 * (r & 1), 2 * t + h + 8 * (r >> 1)] = a[lane, r, h]
            for r in range(2):
                B[2 * t + h + 8 * r, g] = b[lane, r, h]
    D = A @ B
    lanes = np.arange(32)
    g, t = lanes >> 2, lanes & 3
    return np.stack([D[g + 8 * (r >> 1), 2 * t + (r & 1)] for r in range(4)], axis=1)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [64, 128])
def test_swapped_kernel_mirror_gives_the_product(bits: int, group: int) -> None:
    """mixed_mmv.cu's operand choices, mirrored step by step on the CPU and multiplied by the
    PTX definition of the MMA: the A fragment of 16 output columns read from the packed B
    pairs as {f[4i], f[4i+2], f[4i+1], f[4i+3]}, x row g as the B operand (zeros past M), the
    scale of column 8 j + g from row g / 2 of the scale words, half g % 2 (``column_scales``),
    accumulator e of tile i as column 16 i + 8 (e / 2) + g, row 2 t + e % 2; salient steps the
    same way. The result must be x @ W^T + x[:, S] @ W_S^T."""
    K, N, M, k_sal = 256, 128, 3, 20
    gen = torch.Generator().manual_seed(7 * bits + group)
    codes = torch.randint(0, 2**bits, (K, N), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (K // group, N), generator=gen, dtype=torch.int32)
    scales = (torch.rand(K // group, N, generator=gen) * 0.02 + 1e-3).half()
    sidx = torch.randperm(K, generator=gen)[:k_sal].to(torch.int32)
    wst = torch.randn(k_sal, N, generator=gen).half()
    p = layout.pack(codes, zeros, scales, wst, sidx, bits, group)
    exact, _, _ = kernel_operands(p)  # code - zero as the lanes form it, [K, N]
    sw = p.scp.view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF
    sal = layout.pack_salient(wst).view(torch.float16).double().numpy()  # [Q, B, 4, 32, 8]
    x = torch.randn(M, K, generator=gen).half().double().numpy()
    xz = np.vstack([x, np.zeros((8 - M, K))])  # B-operand rows past M read zeros
    xs = np.zeros((8, sal.shape[0] * 16))
    xs[:, :k_sal] = xz[:, sidx.long().numpy()]
    lanes = np.arange(32)
    g, t = lanes >> 2, lanes & 3
    order = [0, 2, 1, 3]  # A register r = pair 4 i + order[r]

    def b_operand(cols: np.ndarray, k0: int) -> np.ndarray:  # words xr[k], xr[k + 4]
        return np.stack(
            [np.stack([cols[g, k0 + 2 * t + 8 * r + h] for h in range(2)], -1) for r in range(2)],
            1,
        )

    y = np.zeros((M, N))
    for b in range(N // 64):
        acc = np.zeros((4, 32, 4))
        for q in range(sal.shape[0]):  # salient k16 steps: fp16 pairs as stored
            f = np.stack(
                [
                    np.stack([sal[q, b, pr // 4, :, 2 * (pr % 4) + h] for h in range(2)], -1)
                    for pr in range(16)
                ],
                1,
            )  # [32, 16 pairs, 2]
            bo = b_operand(xs, 16 * q)
            for i in range(4):
                acc[i] += ptx_mma_m16n8k16(f[:, [4 * i + o for o in order]], bo)
        for s in range(K // 64):
            gacc = np.zeros((4, 32, 4))
            for st in range(4):
                k0 = 64 * s + 16 * st
                f = np.stack(
                    [
                        np.stack(
                            [
                                exact[k0 + 8 * (pr & 1) + 2 * t + h, 64 * b + 8 * (pr >> 1) + g]
                                for h in range(2)
                            ],
                            -1,
                        )
                        for pr in range(16)
                    ],
                    1,
                )
                bo = b_operand(xz, k0)
                for i in range(4):
                    gacc[i] += ptx_mma_m16n8k16(f[:, [4 * i + o for o in order]], bo)
            grp = 64 * s // group
            for lane in range(32):  # column_scales: row g / 2 of the scale words, half g % 2
                srow, shalf = g[lane] >> 1, g[lane] & 1
                col_scale = [as_fp16(int(sw[grp, b, srow, j]) >> (16 * shalf)) for j in range(8)]
                for i in range(4):
                    for e in range(4):
                        acc[i, lane, e] += float(col_scale[2 * i + (e >> 1)]) * gacc[i, lane, e]
        for lane in range(32):
            for i in range(4):
                for e in range(4):
                    row, col = 2 * t[lane] + (e & 1), 64 * b + 16 * i + 8 * (e >> 1) + g[lane]
                    if row < M:
                        y[row, col] = acc[i, lane, e]
    g_idx = torch.arange(K) // group
    w = ((codes - zeros[g_idx]).double() * scales.double()[g_idx]).numpy()
    want = x @ w + x[:, sidx.long().numpy()] @ wst.double().numpy()
    assert np.allclose(y, want, rtol=1e-9, atol=1e-9), np.abs(y - want).max()


@pytest.mark.parametrize("shape", [(4096, 4096), (131072, 8192), (262144, 28672), (960, 1536)])
def test_swapped_kernel_configurations_fit_in_shared_memory(shape) -> None:
    """Every configuration the routes may launch keeps a block's shared memory (the rings of
    its warps plus the staged x, as ``launch_mmv`` sizes them) within what an SM has, and the
    staged x within MMV_X_BYTES. Without the bound (11b80ae) the rule gave a 131072 x 8192
    layer about 150 KB of staged x per block and a 262144 x 28672 one about 520 KB, past the
    limit."""
    N, K = shape
    for M in range(1, rules.MMV_MAX_M + 1):
        for wn, splits in rules.mmv_configs(M, N, K):
            assert N % (64 * wn) == 0 and 1 <= splits <= K // 64
            per = -(-(K // 64) // splits)  # k-steps per split, as the launch rounds them
            nq = -(-8 // splits)  # salient k16 steps per split: 128 columns, 8 steps
            x_bytes = (M + 1) * (per * 64 + nq * 16 + 8) * 2
            ring = max(wn * d * 32 * 16 for d in rules.MMV_DEPTHS)
            assert x_bytes <= rules.MMV_X_BYTES, (M, wn, splits, x_bytes)
            assert ring + x_bytes <= 227 * 1024


def test_cluster_configurations_are_named_and_offered_where_they_may_pay(monkeypatch) -> None:
    """'mmv:WNxS[dD][cC]' round-trips; the one-cluster configuration is timed at first use only
    for M = 5-16, on sm_90, where the launch runs exactly MMV_CLUSTER splits and x fits."""
    from gift_quant.kernels.triton import routes

    d = rules.MMV_DEPTH
    assert routes.mma_config("mmv:4x8c8") == (4, 8, d, 8)
    assert routes.mma_config("mmv:4x16d16c16") == (4, 16, 16, 16)
    assert routes.mma_config("mmv:4x16d16") == (4, 16, 16, 1)
    for c in [(4, 8, d, 8), (2, 16, 32, 16), (1, 3, 16, 1), (4, 38, d, 2)]:
        assert routes.mma_config(routes.mmv_name(*c)) == c
    monkeypatch.setattr(rules, "clusters_supported", lambda: True)
    assert rules.mmv_cluster_configs(16, 28672, 4096) == [(4, 8, d, 8)]
    assert rules.mmv_cluster_configs(5, 13824, 5120) == [(4, 8, d, 8)]
    assert rules.mmv_cluster_configs(4, 28672, 4096) == []  # M <= 4: it lost
    assert rules.mmv_cluster_configs(16, 4096, 14336) == []  # x needs more than 8 splits
    assert rules.mmv_cluster_configs(16, 4096, 640) == []  # 10 k-steps run as 5 splits
    assert "mmv:4x8c8" in routes.tuning_names(16, 28672, 4096, 4)
    assert "mmv:4x8c8" in routes.candidates(16, mma=True, N=28672, K=4096)
    monkeypatch.setattr(rules, "clusters_supported", lambda: False)
    assert rules.mmv_cluster_configs(16, 28672, 4096) == []
    assert not any("c" in n[4:] for n in routes.tuning_names(16, 28672, 4096, 4))


def test_tensor_core_cluster_configurations_are_named_and_offered(monkeypatch) -> None:
    """'mma:WNxS[kKW][cC]' round-trips; the configurations with every split in one cluster (8 or 16
    blocks) are timed at first use for M = 5-32 on sm_90, at each block width the layer
    allows, where the launch runs exactly that many splits and x fits in shared memory."""
    from gift_quant.kernels.triton import routes

    assert routes.mma_config("mma:4x16c16") == (4, 16, 16, 1)
    assert routes.mma_config("mma:2x12") == (2, 12, 1, 1)
    assert routes.mma_config("mma:1x4k4c4") == (1, 4, 4, 4)
    assert routes.mma_config("mma:2x8k2") == (2, 8, 1, 2)
    for c in [(4, 8, 8, 1), (2, 16, 16, 1), (1, 3, 1, 1), (4, 32, 16, 1), (1, 2, 2, 8)]:
        assert routes.mma_config(routes.mma_name(*c)) == c
    assert routes.mma_name(2, 16) == "mma:2x16"
    assert routes.mma_name(1, 4, 2, 4) == "mma:1x4k4c2"
    monkeypatch.setattr(rules, "clusters_supported", lambda: True)
    both = [(2, 8, 8), (2, 16, 16), (4, 8, 8), (4, 16, 16)]
    assert rules.mma_cluster_configs(16, 4096, 4096) == both
    assert rules.mma_cluster_configs(16, 5120, 5120) == both  # 80 k-steps: 10 x 8, 5 x 16
    assert rules.mma_cluster_configs(4, 4096, 4096) == []  # M <= 4: not timed
    assert rules.mma_cluster_configs(33, 4096, 4096) == []  # past the first-use timing
    # x of 32 rows (33 staged) within about 96 KB: 21 x 64 columns a split, so 14336 columns
    # need 11 splits (more than a cluster of 8) and 28672 need 22 (more than 16)
    assert rules.mma_cluster_configs(32, 4096, 14336) == [(2, 16, 16), (4, 16, 16)]
    assert rules.mma_cluster_configs(32, 4096, 28672) == []
    assert rules.mma_cluster_configs(16, 960, 640) == []  # 10 k-steps run as 10 / 5 splits
    assert rules.mma_cluster_configs(16, 960, 1024) == [(1, 8, 8), (1, 16, 16)]  # 15 strips
    assert "mma:4x16c16" in routes.tuning_names(16, 4096, 4096, 4)
    assert "mma:4x16c16" in routes.candidates(16, mma=True, N=4096, K=4096)
    monkeypatch.setattr(rules, "clusters_supported", lambda: False)
    names = routes.tuning_names(16, 4096, 4096, 4)
    assert not any(n.startswith("mma:") and "c" in n for n in names)


def test_shared_strip_configurations_fill_one_wave(monkeypatch) -> None:
    """The configurations with warps sharing a strip, timed at first use for M = 5-16: each
    built (strips, KW) pair at the splits that fill one wave of about 8 warps per SM on 132
    SMs (4096^2: 64 strips, 64 k-steps; 5120^2: 80 of each, 80 k-steps as 6 splits of 14 or
    3 of 27), none where two splits (the x-staging minimum) already take more than a wave
    (28672 x 4096), 2 splits also in one cluster of 2 (sm_90)."""
    from gift_quant.kernels.triton import routes

    monkeypatch.setattr(rules, "clusters_supported", lambda: True)
    want = [(1, 8, 1, 2), (2, 8, 1, 2), (4, 8, 1, 2), (1, 4, 1, 4), (2, 4, 1, 4)]
    assert rules.mma_kw_configs(16, 4096, 4096) == want + [(1, 2, 1, 8), (1, 2, 2, 8)]
    assert rules.mma_kw_configs(5, 4096, 4096) == rules.mma_kw_configs(16, 4096, 4096)
    assert rules.mma_kw_configs(4, 4096, 4096) == []  # M <= 4: no gain measured
    assert rules.mma_kw_configs(17, 4096, 4096) == []  # 32-row tiles: not built
    assert rules.mma_kw_configs(16, 28672, 4096) == []
    want = [(1, 6, 1, 2), (2, 6, 1, 2), (4, 6, 1, 2), (1, 3, 1, 4), (2, 3, 1, 4)]
    assert rules.mma_kw_configs(16, 5120, 5120) == want
    assert "mma:2x4k4" in routes.tuning_names(16, 4096, 4096, 4)
    assert "mma:1x2k8c2" in routes.candidates(8, mma=True, N=4096, K=4096)
    monkeypatch.setattr(rules, "clusters_supported", lambda: False)
    assert (1, 2, 2, 8) not in rules.mma_kw_configs(16, 4096, 4096)
