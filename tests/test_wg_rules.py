"""The warpgroup-MMA kernel's launch rules and routes (``kernels/cuda/rules.py``,
``kernels/triton/routes.py``): split tails, stream-K, the blocks' own salient gather and
clusters against the blocks an H200 holds at once, the refusals of ``native.mixed_wg`` before
any launch, the timed configurations; and, on a GPU, the device's own cluster query. The
kernel's products are tested in test_wg_kernel.py."""

from __future__ import annotations

import pytest
import torch
from conftest import stream_k_launch

from gift_quant.kernels.cuda import native, rules
from gift_quant.kernels.triton import routes

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


def stream_k_segments(T: int, cb: int, sk0: int, G: int, lanes: int, St: int) -> dict:
    """The kernel's stream-K arithmetic (mixed_wg.cu, SK), block by block: its lanes, its range
    of k-steps, the segments it runs (tile, first k-step, end) and, for a head, the blocks whose
    partial tiles it adds (the kernel's loop over c). Written after the kernel, line for line,
    for the checks below, which do not know how the work is dealt out; ``lanes`` as the kernel
    takes it (conftest.stream_k_launch)."""
    out = {}
    for bx in range(sk0 + G):
        j = bx - sk0
        if j < 0:
            tile0, tstep, u0, u1 = 0, 1, bx * St, bx * St + St
        else:
            U, GL = (T * cb - sk0) // lanes * St, G // lanes

            def sk_begin(jj, U=U, GL=GL):
                return U * jj // GL

            tile0, tstep = sk0 + j % lanes, lanes
            u0, u1 = sk_begin(j // lanes), sk_begin(j // lanes + 1)
        segs, heads = [], []
        r, i, d = 0, u0 // St, u0 - u0 // St * St
        while r < u1 - u0:
            end = min(r + St - d, u1 - u0)
            tx = tile0 + i * tstep
            segs.append((tx, d, end - r + d))
            if j >= 0 and d == 0 and end - r < St:  # a head: the kernel's loop over c
                c = j + lanes
                while sk_begin(c // lanes) < (i + 1) * St:
                    heads.append((tx, c))
                    c += lanes
            r, d, i = end, 0, i + 1
        out[j] = dict(
            range=(u0, u1), segs=segs, heads=heads, walk=producer_walk(u0, u1, St, T, tile0, tstep)
        )
    return out


def producer_walk(u0: int, u1: int, St: int, T: int, tile0: int, tstep: int) -> list:
    """The stream-K producer's copies over a block's range (mixed_wg.cu, SK, `first` and
    `next`), slot by slot: (k-step d, row tile rt, column block cb)."""
    i = u0 // St
    tx = tile0 + i * tstep
    d, rt, cb = u0 - i * St, tx % T, tx // T
    out = []
    for _ in range(u1 - u0):
        out.append((d, rt, cb))
        d += 1
        if d == St:
            d = 0
            if tstep == T:
                cb += 1
            else:
                rt += 1
                if rt == T:
                    rt, cb = 0, cb + 1
    return out


@pytest.mark.parametrize("nt", [128, 256])
@pytest.mark.parametrize("nsal", [0, 37, 200])
def test_stream_k_lanes_deal_every_k_step_once(nt: int, nsal: int) -> None:
    """The stream-K schedule over the shapes its launches take on a 132-block wave (H100 and
    H200) and on smaller and odd waves: every k-step of every tile runs exactly once; a block
    leaves at most one partial tile, from its first segment, where it starts inside a tile; a
    head adds exactly the partial tiles of its tile, all from blocks launched after it; and
    with a lane per row tile, the blocks that hold one column block's row tiles run the same
    k-steps at the same point of their ranges (so their weight reads meet in L2); and each
    block's producer copies, slot by slot, the k-steps its consumers run."""
    lanes_seen = set()
    for wave in (132, 66, 50):
        for M in (70, 128, 300, 520, 700, 1000):
            for N, K in ((256, 256), (1024, 1024), (7680, 256), (16384, 512), (4096, 4096)):
                St = K // 64 + (nsal + 63) // 64
                launch = stream_k_launch(M, N, nt, St, wave)
                if launch is None:
                    continue  # whole waves: the launch refuses a stream-K schedule
                T, sk0, G, lanes = launch
                cb = N // 128
                blocks = stream_k_segments(T, cb, sk0, G, lanes, St)
                done = {}
                partials = {}  # tile -> SK blocks that left a partial tile of it
                for j, b in blocks.items():
                    for n, (tx, d0, d1) in enumerate(b["segs"]):
                        for d in range(d0, d1):
                            assert (tx, d) not in done, (M, N, K, wave, j, tx, d)
                            done[tx, d] = j
                        if d0 > 0:
                            assert n == 0 and j >= 0, (M, N, K, wave, j, b["segs"])
                            partials.setdefault(tx, []).append(j)
                assert set(done) == {(tx, d) for tx in range(T * cb) for d in range(St)}
                for j, b in blocks.items():  # the producer copies what the consumers run
                    run = [(d, tx % T, tx // T) for tx, d0, d1 in b["segs"] for d in range(d0, d1)]
                    assert b["walk"] == run, (M, N, K, wave, j)
                heads = {}
                for j, b in blocks.items():
                    for tx, c in b["heads"]:
                        assert c > j and c in partials.get(tx, []), (M, N, K, wave, j, tx, c)
                        heads.setdefault(tx, []).append(c)
                assert {tx: sorted(c) for tx, c in heads.items()} == {
                    tx: sorted(c) for tx, c in partials.items()
                }, (M, N, K, wave)
                lanes_seen.add((wave, lanes > 1))
                if lanes > 1:
                    for j in range(0, G, lanes):  # one group: the same ranges, one column block
                        group = [blocks[j + k] for k in range(lanes)]
                        assert len({b["range"] for b in group}) == 1
                        for n in range(len(group[0]["segs"])):
                            cols = {b["segs"][n][0] // T for b in group}
                            rows = {b["segs"][n][0] % T for b in group}
                            assert len(cols) == 1 and len(rows) == lanes, (M, N, K, wave, j)
    # both kinds of schedule were checked on the 132-block wave
    assert {(132, True), (132, False)} <= lanes_seen, lanes_seen


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
        native.mixed_wg(x, None, None, torch.zeros(1), cnt[:1000], 256, 2, 1, stream_k=True)
    # the blocks' own salient gather: tiles of 64 rows or fewer without stream-K only
    with pytest.raises(
        ValueError, match="64 rows or fewer without stream-K; this launch has 128-row"
    ):
        native.mixed_wg(x, None, None, torch.zeros(1), cnt, 128, 2, 1, gather=True)
    with pytest.raises(ValueError, match="has 64-row tiles and stream-K"):
        native.mixed_wg(x, None, None, torch.zeros(1), cnt, 64, 2, 1, stream_k=True, gather=True)


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
