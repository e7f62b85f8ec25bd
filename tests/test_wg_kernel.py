"""The warpgroup-MMA kernel (``kernels/cuda/mixed_wg.cu``, sm_90a): its reading of the packed
words, mirrored on the CPU, its launch rules and routes; on an H200, its products against the
float64 oracle.

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


# clusters of 2, 3, 4, 5, 6, 7, 8 and 16 blocks of the warpgroup kernel an H200 held at once
# (cudaOccupancyMaxActiveClusters, round 27): 64 x 2 tiles run two blocks per SM, others one
SIZES = (2, 3, 4, 5, 6, 7, 8, 16)
H200_CLUSTERS = {
    (64, 2): dict(zip(SIZES, (132, 79, 62, 47, 39, 32, 30, 14), strict=True)),
    "other": dict(zip(SIZES, (66, 39, 30, 22, 17, 15, 15, 7), strict=True)),
}


def h200_clusters(nt: int, wgs: int, cluster: int) -> int:
    return H200_CLUSTERS.get((nt, wgs), H200_CLUSTERS["other"])[cluster]


def h200_wave(nt: int, wgs: int) -> int:
    """Blocks an H200 runs at once: 132 SMs, two blocks per SM at two warpgroups of 64 rows or
    fewer (16 x 2 may hold three: not measured), one otherwise."""
    return 264 if wgs == 2 and nt <= 64 else 132


def test_a_split_tail_where_the_last_wave_is_partial() -> None:
    """``rules.wg_tail_configs``: a 256-row tile whose whole tiles fill at least one wave and
    leave a partial one gets the tail count (2..4, at least 4 k-steps a split) whose last wave
    is shortest, where it is shorter than a whole tile's."""
    # 28672 x 4096, M = 512, 256-row tiles: 2 x 224 = 448 tiles = 3 x 132 + 52; 52 x 2 = 104
    # blocks fit one wave of half a tile (4 splits: 208 blocks, two waves of a quarter: the same)
    assert (256, 2, 1, 1, 2) in rules.wg_tail_configs(512, 28672, 4096, h200_wave)
    # 13824 x 5120, M = 512: 2 x 108 = 216 = 132 + 84; 2 splits: 168 blocks, two waves of a half
    # (no gain); 3 splits: 252 blocks, two waves of a third
    assert (256, 2, 1, 1, 3) in rules.wg_tail_configs(512, 13824, 5120, h200_wave)
    # 4096^2, M = 512: 2 x 32 = 64 tiles of 256 rows, 128 of 128 x 2: less than a wave
    assert rules.wg_tail_configs(512, 4096, 4096, h200_wave) == []
    # whole waves: 256-row tiles at M = 512 on 16896 columns: 264 tiles, exactly two waves
    assert rules.wg_tail_configs(512, 16896, 4096, h200_wave) == []
    # 128-row tiles are not given a tail (28672 x 4096, M = 128: 224 tiles, 1.7 waves)
    assert rules.wg_tail_configs(128, 28672, 4096, h200_wave) == []
    # 6 k-steps: no split of at least 4
    assert rules.wg_tail_configs(512, 28672, 384, h200_wave) == []
    for M, N, K in [(512, 28672, 4096), (512, 13824, 5120), (512, 12288, 4096)]:
        for nt, wgs, splits, cluster, tail in rules.wg_tail_configs(M, N, K, h200_wave):
            tiles, wave = -(-M // nt) * (N // 64 // wgs), h200_wave(nt, wgs)
            last = tiles % wave
            assert splits == cluster == 1 and 2 <= tail <= 4 and tiles > wave and last
            assert -(-last * tail // wave) < tail  # the last wave shorter than a tile


def test_stream_k_where_the_tiles_leave_a_partial_wave() -> None:
    """``rules.wg_stream_configs``: the 128- and 256-row tiles of two warpgroups of
    ``wg_configs`` whose tiles are not a whole number of waves get a stream-K configuration."""
    # 5120^2, M = 256: 40 tiles of 256 x 2, 80 of 128 x 2 (less than a wave of 132); 64-row
    # tiles and four warpgroups are not compiled with the schedule
    assert set(rules.wg_stream_configs(256, 5120, 5120, h200_wave)) == {
        (128, 2, 1, 1, 1, True),
        (256, 2, 1, 1, 1, True),
    }
    # 28672 x 4096, M = 512: 448 tiles = 3 x 132 + 52 (and 896 of 128 rows = 6 x 132 + 104)
    assert (256, 2, 1, 1, 1, True) in rules.wg_stream_configs(512, 28672, 4096, h200_wave)
    # whole waves: 264 tiles of 256 rows at M = 512 on 16896 columns, 528 of 128 rows
    assert rules.wg_stream_configs(512, 16896, 4096, h200_wave) == []
    # M = 64: the tiles of wg_configs are 64 rows only
    assert rules.wg_stream_configs(64, 4096, 4096, h200_wave) == []
    assert rules.wg_stream_configs(512, 4096, 4096, lambda nt, wgs: 0) == []  # no wave known


def test_a_stream_k_launch_refuses_too_few_counters(monkeypatch) -> None:
    """``native.mixed_wg`` with ``stream_k``: counters short of one flag per MMA warp of each
    block of a wave are refused before any launch, naming what it needs (the partial tiles go
    to a scratch buffer of the launch's own: one per block of a wave, whatever ``ws`` is)."""
    monkeypatch.setattr(native, "wg_available", lambda: True)
    monkeypatch.setattr(native, "wg_wave_blocks", h200_wave)
    x = torch.zeros(300, 256, dtype=torch.float16)
    need = 132 * 256 * 2 * 64
    assert native.wg_stream_floats(256, 2) == need
    cnt = torch.zeros(1 << 16, dtype=torch.int32)
    with pytest.raises(ValueError, match="needs 1056 counters"):
        native.mixed_wg(x, None, None, torch.zeros(need), cnt[:1000], 256, 2, 1, stream_k=True)
    # the blocks' own salient gather: tiles of 64 rows or fewer without stream-K only
    with pytest.raises(
        ValueError, match="64 rows or fewer without stream-K; this launch has 128-row"
    ):
        native.mixed_wg(x, None, None, torch.zeros(need), cnt, 128, 2, 1, gather=True)
    with pytest.raises(ValueError, match="has 64-row tiles and stream-K"):
        native.mixed_wg(x, None, None, torch.zeros(need), cnt, 64, 2, 1, stream_k=True, gather=True)


def test_the_blocks_gather_where_a_launch_fits_on_the_gpu(monkeypatch) -> None:
    """``rules.wg_gather_configs``: the configurations of 64 rows or fewer of ``wg_configs`` and
    ``wg_cluster_configs`` whose blocks an H200 holds all at once (clusters too), each with the
    blocks' own gather ("...g"), none with a tail or stream-K; the names round-trip."""
    monkeypatch.setattr(rules, "clusters_supported", lambda: True)
    for M, N, K in [(32, 4096, 4096), (64, 4096, 4096), (64, 5120, 5120), (64, 28672, 4096)]:
        confs = rules.wg_gather_configs(M, N, K, h200_wave, h200_clusters)
        base = [(nt, w, s, 1) for nt, w, s in rules.wg_configs(M, N, K)]
        base += rules.wg_cluster_configs(M, N, K, h200_clusters)
        assert confs and len(set(confs)) == len(confs)
        for nt, wgs, splits, cl, tail, sk, gather in confs:
            assert (nt, wgs, splits, cl) in base and (tail, sk, gather) == (1, False, True)
            tiles = -(-M // nt) * (N // 64 // wgs)
            assert nt <= 64 and tiles * splits <= h200_wave(nt, wgs)
            assert cl == 1 or tiles <= h200_clusters(nt, wgs, cl)
            name = routes.wg_name(nt, wgs, splits, cl, 1, False, True)
            assert name.endswith("g") and routes.mma_config(name) == (
                nt,
                wgs,
                splits,
                cl,
                1,
                False,
                True,
            )
        # every configuration of 64 rows or fewer that fits is there
        fits = [
            c
            for c in base
            if c[0] <= 64
            and -(-M // c[0]) * (N // 64 // c[1]) * c[2] <= h200_wave(c[0], c[1])
            and (
                c[3] == 1
                or rules.wg_gather_fits(
                    -(-M // c[0]) * (N // 64 // c[1]), h200_clusters(c[0], c[1], c[3])
                )
            )
        ]
        assert [c[:4] for c in confs] == fits
    # 4096^2 at M = 64: 32 tiles of 64 x 2, in 3 splits (96 blocks, 32 clusters of 3)
    assert (64, 2, 3, 3, 1, False, True) in rules.wg_gather_configs(
        64, 4096, 4096, h200_wave, h200_clusters
    )
    # clusters leave an eighth of the device's free: 32 clusters of 7 are the bound (32), not
    # gathered by the blocks (3.3x the time at first use in a benchmark's graph); 32 of 6 (of
    # 39) are, and 40 tiles of 5120 x 5120 in clusters of 5 (of 47: 41 allowed)
    down = rules.wg_gather_configs(64, 4096, 14336, h200_wave, h200_clusters)
    assert (64, 2, 7, 7, 1, False, True) not in down and (64, 2, 6, 6, 1, False, True) in down
    assert (64, 2, 7, 7) in rules.wg_cluster_configs(64, 4096, 14336, h200_clusters)
    assert (64, 2, 5, 5, 1, False, True) in rules.wg_gather_configs(
        64, 5120, 5120, h200_wave, h200_clusters
    )
    assert [rules.wg_gather_fits(t, 32) for t in (28, 29, 32)] == [True, False, False]
    assert [rules.wg_gather_fits(t, 47) for t in (41, 42)] == [True, False]
    # 28672 x 4096: 224 tiles of 64 x 2 fit one split (two blocks per SM), not two
    wide = rules.wg_gather_configs(64, 28672, 4096, h200_wave, h200_clusters)
    assert (64, 2, 1, 1, 1, False, True) in wide and not any(c[1] == 2 and c[2] > 1 for c in wide)
    monkeypatch.setattr(native, "wg_max_clusters", h200_clusters)
    monkeypatch.setattr(native, "wg_wave_blocks", h200_wave)
    names = routes.candidates(64, mma=True, N=4096, K=4096, wg=True)
    assert {"wg:64x2x3c3", "wg:64x2x3c3g", "wg:64x4x1g"} <= set(names)


def test_warpgroup_rules_and_routes(monkeypatch) -> None:
    """The smallest tile holding M rows (64 / 128 / 256), two warpgroups; K split until the
    blocks fill the GPU, each split at least 4 k-steps; "wg:NTxWxS[cC]" round-trips; with
    clusters (sm_90) each configuration that splits K also with its splits in one cluster; a
    candidate only with ``wg``."""
    assert rules.wg_choose(64, 4096, 4096) == (64, 2, 5)  # 32 blocks x 5 splits (4 x 13 steps)
    assert rules.wg_choose(128, 28672, 4096) == (128, 2, 1)  # 224 blocks already
    assert rules.wg_choose(512, 4096, 4096) == (256, 2, 3)  # 2 tiles x 32 x 3 splits
    assert rules.wg_choose(200, 1024, 128) == (256, 2, 1)  # 2 k-steps: no split
    assert rules.wg_choose(16, 4096, 4096)[0] == 64  # the rule: 64 rows and up
    # 16- and 32-row tiles timed where M takes at most two of them
    tiles = {M: {c[0] for c in rules.wg_configs(M, 4096, 4096)} for M in (9, 20, 33, 65)}
    assert tiles == {9: {16, 64}, 20: {16, 32, 64}, 33: {32, 64}, 65: {64, 128}}
    for M in (33, 64, 65, 200, 512, 1000):
        for N, K in [(4096, 4096), (28672, 4096), (5120, 13824), (896, 1536)]:
            confs = rules.wg_configs(M, N, K)
            assert confs[0] == rules.wg_choose(M, N, K) and len(set(confs)) == len(confs)
            for nt, wgs, splits in confs:
                assert nt in rules.WG_TILES and (nt == 64 or nt < 2 * M)
                assert (N // 64) % wgs == 0 and (wgs == 2 or nt < 256)
                assert splits == 1 or -(-(K // 64) // splits) >= 4
                name = routes.wg_name(nt, wgs, splits)
                assert routes.mma_config(name) == (nt, wgs, splits, 1, 1, False, False)
                assert "c" not in name and "t" not in name and not name.endswith(("s", "g"))
    assert routes.wg_name(64, 2, 8, 8) == "wg:64x2x8c8"
    assert routes.mma_config("wg:64x2x8c8") == (64, 2, 8, 8, 1, False, False)
    assert routes.wg_name(256, 2, 1, 1, 3) == "wg:256x2x1t3"
    assert routes.mma_config("wg:256x2x1t3") == (256, 2, 1, 1, 3, False, False)
    assert routes.wg_name(256, 2, 1, 1, 1, True) == "wg:256x2x1s"
    assert routes.mma_config("wg:128x2x1s") == (128, 2, 1, 1, 1, True, False)
    assert routes.wg_name(64, 2, 3, 3, 1, False, True) == "wg:64x2x3c3g"
    assert routes.mma_config("wg:64x4x8g") == (64, 4, 8, 1, 1, False, True)
    assert rules.wg_configs(128, 960, 1536) == []  # 15 strips: no block of two
    monkeypatch.setattr(rules, "clusters_supported", lambda: True)

    clustered = rules.wg_cluster_configs(64, 4096, 4096, h200_clusters)
    assert len(set(clustered)) == len(clustered)
    # 32 tiles of 64 x 2 (32 clusters): up to 7 splits; 16 of 64 x 4 (one block per SM): 6
    assert {c for c in clustered if c[0] == 64} == {
        (64, w, s, s) for w, top in ((2, 7), (4, 6)) for s in range(2, top + 1)
    }
    # 5120 columns: 40 tiles of 64 x 2, 20 of 64 x 4: up to 5 splits at both widths
    held = rules.wg_cluster_configs(64, 5120, 5120, h200_clusters)
    assert {c for c in held if c[0] == 64} == {(64, w, s, s) for w in (2, 4) for s in range(2, 6)}
    # 16 k-steps: at most 4 splits of 4; 5 runs as 4 (4 k-steps each)
    short = rules.wg_cluster_configs(64, 4096, 1024, h200_clusters)
    assert sorted(c[2] for c in short if c[0] == 64) == [
        2,
        2,
        3,
        3,
        4,
        4,
    ]
    # up to 5 splits, clusters that run in waves are timed too (80 clusters of 4 here); past 5 not
    large = rules.wg_cluster_configs(512, 5120, 13824, h200_clusters)
    assert (256, 2, 4, 4) in large and not any(c[2] > 5 for c in large)
    assert rules.wg_cluster_configs(300, 1024, 128, h200_clusters) == []  # 2 k-steps: no split
    monkeypatch.setattr(native, "wg_max_clusters", h200_clusters)
    monkeypatch.setattr(native, "wg_wave_blocks", h200_wave)
    names = routes.candidates(64, mma=True, N=4096, K=4096, wg=True)
    assert "wg:64x2x7c7" in names and "wg:64x2x8" in names and "wg:64x2x8c8" not in names
    monkeypatch.setattr(rules, "clusters_supported", lambda: False)
    assert rules.wg_cluster_configs(64, 4096, 4096, h200_clusters) == []
    assert "wg:64x4x1" in routes.candidates(64, mma=True, N=4096, K=4096, wg=True)
    assert not any(n.startswith("wg:") for n in routes.candidates(64, mma=True, N=4096, K=4096))


def test_warpgroup_configurations_are_timed_from_9_rows(monkeypatch, stand_in_timer) -> None:
    """Where the warpgroup kernel is built, calls of 33..512 rows (fp16 here) time its
    configurations and the table's route once per power-of-two M bucket and keep the fastest
    (a stand-in timer whose winner the test sets); calls of 9..32 rows time its configurations
    of 64 rows or fewer beside the other CUDA kernels'; past 512 rows, on N not a multiple of
    128, or where it is not built, the rule serves untimed (and 9..32 rows time no
    warpgroup configuration)."""
    from gift_quant.kernels.triton import dispatch, tuning

    monkeypatch.setattr(native, "wg_available", lambda: True)
    monkeypatch.setattr(native, "wg_wave_blocks", h200_wave)
    monkeypatch.setattr(rules, "clusters_supported", lambda: False)  # as on the CPU, any GPU
    N, K = 4096, 4096
    timer = stand_in_timer("wg:128x4x2")
    timed = timer.calls
    x = torch.zeros(600, K, dtype=torch.float16)

    def pick(M, n=N):
        sz = torch.zeros(1, n, dtype=torch.int32)
        return dispatch.tuned_route(
            x[:M], None, sz, None, None, None, None, 4, 128, object(), timer
        )

    assert pick(100) == "wg:128x4x2"
    confs = [*rules.wg_configs(100, N, K), *rules.wg_stream_configs(100, N, K, h200_wave)]
    confs += rules.wg_gather_configs(100, N, K, h200_wave, h200_clusters)
    want = [routes.wg_name(*c) for c in confs] + [routes.route(100, N, K, 4)]
    assert timed == [want] and "wg:64x2x1" in want and not any("x256" in n for n in want)
    assert "wg:128x2x1s" in want  # 32 tiles of 128 x 2: less than a wave
    assert pick(128) == "wg:128x4x2" and len(timed) == 1  # bucket 65..128: kept
    fp16 = torch.float16
    taken = routes.route_in_force(70, N, K, 4, 128, 0, True, device=None, wg=True, dtype=fp16)
    assert taken == "wg:128x4x2"
    untimed = routes.route_in_force(70, N, K, 4, 128, 0, True, device=None, dtype=fp16)
    assert untimed == routes.route(70, N, K, 4)
    timer.winner = routes.route(40, N, K, 4)  # the table's Triton kernel wins at 40 rows
    assert pick(40) == timer.winner and len(timed) == 2
    assert {routes.mma_config(n)[0] for n in timed[1][:-1]} == {32, 64}  # 32 and 64 rows
    for M in (513, 600):
        assert pick(M) == routes.route(M, N, K, 4, mma=True) == "cublas"
    assert pick(100, n=960) == routes.route(100, 960, K, 4, mma=True)  # 15 strips
    timer.winner = "wg:64x2x4"  # bucket 17..32: the warpgroup kernel among the CUDA kernels
    assert pick(20) == "wg:64x2x4" and len(timed) == 3
    wgs = [n for n in timed[2] if n.startswith("wg:")]
    gathers = rules.wg_gather_configs(20, N, K, h200_wave, h200_clusters)
    assert wgs == [routes.wg_name(*c) for c in [*rules.wg_configs(20, N, K), *gathers]]
    assert len(wgs) > 2 and "wg:64x2x4g" in wgs
    assert {routes.mma_config(n)[0] for n in wgs} == {16, 32, 64}
    assert any(n.startswith("mma:") for n in timed[2]) and timed[2][-1] == routes.route(20, N, K, 4)
    assert pick(32) == "wg:64x2x4" and len(timed) == 3  # the same bucket: kept
    monkeypatch.setattr(rules, "clusters_supported", lambda: True)  # sm_90: clustered too
    monkeypatch.setattr(native, "wg_max_clusters", h200_clusters)
    timer.winner = "wg:64x2x4c4"
    assert pick(200) == "wg:64x2x4c4" and len(timed) == 4
    assert {"wg:64x2x4", "wg:64x2x4c4"} <= set(timed[3])
    # 3 and 6 splits, not among wg_configs' counts, only where all 4 x 32 clusters fit: no
    assert "wg:64x2x3c3" not in timed[3] and "wg:64x2x6c6" not in timed[3]
    monkeypatch.setattr(rules, "clusters_supported", lambda: False)
    assert "wg:64x2x4" in routes.candidates(32, mma=True, N=N, K=K, wg=True)
    assert "wg:16x2x4" in routes.candidates(16, mma=True, N=N, K=K, wg=True)
    assert not any(n.startswith("wg:") for n in routes.candidates(8, mma=True, N=N, K=K, wg=True))
    monkeypatch.setattr(native, "wg_available", lambda: False)
    assert pick(300) == routes.route(300, N, K, 4, mma=True)
    assert len(timed) == 4
    tuning._kept.clear()
    pick(20)  # timed again, without the warpgroup kernel
    assert len(timed) == 5 and not any(n.startswith("wg:") for n in timed[4])
    assert tuning.m_bucket(33) == 64 and tuning.m_bucket(300) == 512


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cluster_query_asks_the_device() -> None:
    """``native.wg_max_clusters`` (cudaOccupancyMaxActiveClusters after the launch's own
    shared-memory and cluster-size attributes): every compiled tile holds some clusters of 2 and
    of 16 (the non-portable size), fewer the larger they are, two blocks per SM only at 64 x 2;
    on an H200 exactly the counts measured in round 27."""
    if native.library() is None or not native.wg_available():
        pytest.skip("the warpgroup-MMA kernel is not built here (needs nvcc and sm_90a)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for nt, wgs in [(64, 2), (64, 4), (128, 2), (128, 4), (256, 2)]:
        counts = [native.wg_max_clusters(nt, wgs, c) for c in SIZES]
        assert counts[-1] > 0 and counts == sorted(counts, reverse=True), (nt, wgs, counts)
        per_sm = 2 if (nt, wgs) == (64, 2) else 1
        assert all(n * c <= per_sm * sms for n, c in zip(counts, SIZES, strict=True)), counts
        if "H200" in torch.cuda.get_device_name(0):
            assert counts == [h200_clusters(nt, wgs, c) for c in SIZES], (nt, wgs, counts)


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
    launch's own, whatever it held before) and so are the counters, as the other kernels need."""
    from gift_quant.kernels import reference
    from gift_quant.kernels.triton import dispatch, ops
    from gift_quant.testing import ERROR_FACTOR, kernel_error, oracle, random_mixed_linear

    if native.library() is None or not native.wg_available():
        pytest.skip("the warpgroup-MMA kernel is not built here (needs nvcc and sm_90a)")
    shapes = [(300, 1024, 1024), (520, 6144, 512), (520, 16384, 256), (70, 256, 256)]
    seen = set()
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
