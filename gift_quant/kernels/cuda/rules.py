"""Launch configurations of the CUDA kernels (``native``): how many warps per block and K
splits a call of M rows on an (N, K) layer takes by rule, and the configurations the first-use
timing measures beside the rule's (``triton.routes``). Pure arithmetic, apart from asking a
device's compute capability (thread-block clusters, dependent launches: sm_90)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

__all__ = [
    "MAX_M",
    "MMA_KW",
    "MMA_KW_M",
    "MMA_KW_MAX_M",
    "MMA_KW_WARPS",
    "MMV_DEPTH",
    "MMV_DEPTHS",
    "MMV_MAX_M",
    "choose",
    "clusters_supported",
    "configs",
    "dependent_launch",
    "dependent_launch_capable",
    "mma_cluster_configs",
    "mma_kw_configs",
    "mmv_choose",
    "mmv_cluster_configs",
    "mmv_configs",
    "wg_choose",
    "wg_cluster_configs",
    "wg_stream_configs",
    "wg_tail_configs",
    "wg_configs",
]

MAX_M = 64
MMV_MAX_M = 16  # one 8-row tile of x up to 8 rows, two up to 16
MMV_DEPTHS = (8, 16, 32)  # x 16 bytes of weights per lane in its shared-memory ring (mixed_mmv.cu)
# the fastest configuration had it in 23 of 24 cells of sweep_mmv_h200_m1_ring.json.gz
MMV_DEPTH = 8
MMV_TARGET_WARPS = 2560  # about 20 warps per SM of an H200 (132 SMs): one wave
# with two 8-row tiles of x (M > 8, 16 warps per SM): half as many; in the M = 12 / 16 sweep
# (sweep_mmv_h200_m12_16.json.gz) the rule at 2560 was 13% behind the best configuration on
# average, at 1280 it was the best wherever that configuration was measured
MMV_TARGET_WARPS_TWO_TILES = 1280
MMV_X_BYTES = 32 * 1024  # the most shared memory a block's staged x may take
# The swapped kernel with its K splits summed in one thread-block cluster (sm_90), timed at
# first use beside the atomic configurations for M = 5-16 where the layer has a multiple of
# 8 x 64 input columns. In the H200 sweep (sweep_mmv_h200_cluster.json.gz, W4, M = 1, 2, 4, 8,
# 16, eight shapes) 8 splits in one cluster of 8 beat every atomic configuration by 15% on
# 28672 x 4096 at M = 16, 4% on 12288 x 4096 at M = 16 and 1-5% on 13824 x 5120 at M = 2-16,
# and lost elsewhere, by up to 31% in time; at M = 1-4 it lost on every other shape. Clusters
# tiling more splits (then added across clusters by atomics) lost all 114 comparisons with
# the same configuration unclustered, by 1-40%: a block cannot leave before its cluster is
# done, so it pays only where the atomic adds it saves (M x N per split) are many. M = 5-7
# were not measured: they share the M = 8 bucket of the first-use timing.
MMV_CLUSTER_M = (5, 16)
MMV_CLUSTER = 8
# The tensor-core kernel with its K splits summed in one thread-block cluster (sm_90; 16 blocks
# is past the portable 8, which sm_90 allows), timed at first use beside the atomic
# configurations for M = 5-32 (round 16): at M = 16 on 4096 x 4096 the atomic configurations
# got faster from 4 to 16 splits and slower past it (tuning in kernels_h200.json), their
# M x N fp32 atomics per split, fence and last-block pass the cost that grows. Kept in 10 of
# the 72 cells at M = 8/16/32 of kernels_h200_r16a.json.gz (5120 x 5120 at M = 8-32, 4096 x 4096
# W2 and 5120 x 13824 W3/W2 at M = 16), taking 1.7-12.6% less time there than the best
# atomic configuration.
MMA_CLUSTER_M = (5, 32)
MMA_CLUSTERS = (8, 16)
# The tensor-core kernel with KW warps sharing each 64-column strip (16-row tiles, M <= 16),
# each a contiguous share of the block's k-steps, added up in shared memory: the layer's k
# range in KW times fewer K splits at the same number of warps. {KW: the strips per block
# it is built with} (at most 8 warps a block).
MMA_KW = {2: (1, 2, 4), 4: (1, 2), 8: (1,)}
MMA_KW_MAX_M = 16
# Timed at first use for M in MMA_KW_M: each pair at the splits that fill one wave of about
# MMA_KW_WARPS warps per SM (ptxas gives these kernels 194-241 registers: 8 warps per SM),
# alone and, where they are 2, in one cluster of 2.
MMA_KW_M = (5, 16)
MMA_KW_WARPS = 8
TARGET_BLOCKS = 264  # about two blocks per SM of an H200 (132 SMs)


def _min_splits(M: int, K: int) -> int:
    """Fewest K splits that keep the staged x (the block's rows x its share of K) within about
    96 KB of shared memory, so that two blocks fit on an SM."""
    rows = 16 * (1 if M <= 16 else 2 if M <= 32 else 4)
    max_steps = max(1, (96 * 1024 // (2 * rows) - 8 - 128) // 64)
    return -(-(K // 64) // max_steps)


def _splits(wn: int, N: int, K: int, factor: float = 1.0) -> int:
    """About ``factor`` x TARGET_BLOCKS blocks of ``wn`` 64-column strips, within 1..K/64."""
    steps = K // 64
    return max(1, min(steps, round(factor * TARGET_BLOCKS / (N // 64 // wn))))


def choose(M: int, N: int, K: int) -> tuple[int, int]:
    """(warps per block, K splits) by rule, without measuring: 64-column strips per warp, about
    TARGET_BLOCKS blocks, the staged x within about 96 KB of shared memory."""
    strips = N // 64
    wn = 4 if strips % 4 == 0 and strips // 4 >= 16 else 2 if strips % 2 == 0 else 1
    return wn, _runs(K, max(_splits(wn, N, K), _min_splits(M, K)))


def _runs(K: int, splits: int) -> int:
    """The K splits the launch really runs for ``splits``: it gives each split
    ceil(steps / splits) k-steps."""
    steps = K // 64
    per = -(-steps // splits)
    return -(-steps // per)


SPLIT_FACTORS = (0.5, 1.0, 2.0, 3.0, 4.0)  # x TARGET_BLOCKS, the split counts tried per width


def configs(M: int, N: int, K: int) -> list[tuple[int, int]]:
    """The (warps per block, K splits) worth timing for M rows of an (N, K) layer: 2 and 4 warps
    where N allows them (1 otherwise), each at SPLIT_FACTORS x TARGET_BLOCKS blocks, never
    below the shared-memory minimum; ``choose``'s rule first. In the (warps, splits) sweep on
    the H200 (sweep_mma_h200_configs.json.gz) the best configuration was 1.11-1.45x the rule's
    on 9 of 56 (shape, bits, M) cells (2 warps at M <= 8, more splits for 8192 x 28672), and
    no single rule found all of them."""
    strips = N // 64
    widths = [wn for wn in (2, 4) if strips % wn == 0] or [1]
    low = _min_splits(M, K)
    out = [choose(M, N, K)]
    for wn in widths:
        for f in SPLIT_FACTORS:
            c = (wn, _runs(K, max(_splits(wn, N, K, f), low)))
            if c not in out:
                out.append(c)
    return out


def _mmv_min_splits(M: int, K: int) -> int:
    """Fewest K splits that keep a block's staged x (M + 1 rows of its share of K, 128 salient
    columns at most, padding) within MMV_X_BYTES, so that wide layers keep several blocks per
    SM and never pass the shared-memory limit."""
    cols = MMV_X_BYTES // (2 * (M + 1)) - 128 - 8
    return -(-(K // 64) // max(1, cols // 64))


def mmv_choose(M: int, N: int, K: int) -> tuple[int, int]:
    """(warps per block, K splits) of the swapped kernel by rule: about MMV_TARGET_WARPS warps
    (one per 64-column strip and split; MMV_TARGET_WARPS_TWO_TILES past 8 rows), each with at
    least 4 k-steps, and x within MMV_X_BYTES."""
    strips, steps = N // 64, K // 64
    wn = 4 if strips % 4 == 0 else 2 if strips % 2 == 0 else 1
    target = MMV_TARGET_WARPS if M <= 8 else MMV_TARGET_WARPS_TWO_TILES
    splits = max(1, min(max(1, steps // 4), round(target / strips)))
    return wn, _runs(K, max(splits, _mmv_min_splits(M, K)))


def mmv_configs(M: int, N: int, K: int) -> list[tuple[int, int]]:
    """The swapped kernel's configurations worth timing: the rule's, then its block width at
    0.5 and 2 x its splits (never below the shared-memory minimum)."""
    wn, splits = mmv_choose(M, N, K)
    out = [(wn, splits)]
    for f in (0.5, 2.0):
        want = max(_mmv_min_splits(M, K), min(K // 64, round(f * splits)))
        c = (wn, _runs(K, want))
        if c not in out:
            out.append(c)
    return out


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def clusters_supported() -> bool:
    """Thread-block clusters on the current CUDA device (sm_90 and later)."""
    return torch.cuda.is_available() and _capability_major(torch.cuda.current_device()) >= 9


def mmv_cluster_configs(M: int, N: int, K: int) -> list[tuple[int, int, int, int]]:
    """(warps, splits, depth, cluster) of the swapped kernel with its splits summed in one
    cluster, worth timing for M rows: MMV_CLUSTER splits of the rule's block width where the
    launch runs exactly that many and x fits (MMV_CLUSTER_M, sm_90); else none."""
    if not MMV_CLUSTER_M[0] <= M <= MMV_CLUSTER_M[1] or not clusters_supported():
        return []
    if _runs(K, MMV_CLUSTER) != MMV_CLUSTER or _mmv_min_splits(M, K) > MMV_CLUSTER:
        return []
    return [(mmv_choose(M, N, K)[0], MMV_CLUSTER, MMV_DEPTH, MMV_CLUSTER)]


def mma_cluster_configs(M: int, N: int, K: int) -> list[tuple[int, int, int]]:
    """(warps, splits, cluster) of the tensor-core kernel with its splits summed in one
    cluster, worth timing for M rows: each block width of ``configs`` at each of MMA_CLUSTERS
    splits that the launch runs exactly and that keep x within the shared-memory minimum
    (MMA_CLUSTER_M, sm_90); else none."""
    if not MMA_CLUSTER_M[0] <= M <= MMA_CLUSTER_M[1] or not clusters_supported():
        return []
    strips = N // 64
    widths = [wn for wn in (2, 4) if strips % wn == 0] or [1]
    return [
        (wn, c, c)
        for wn in widths
        for c in MMA_CLUSTERS
        if _runs(K, c) == c and _min_splits(M, K) <= c
    ]


def mma_kw_configs(M: int, N: int, K: int) -> list[tuple[int, int, int, int]]:
    """(strips per block, splits, cluster, warps per strip) of the tensor-core kernel with KW
    warps sharing each strip, worth timing for M rows (MMA_KW_M): each built pair the layer's
    strips allow, at the splits that fill about one wave of MMA_KW_WARPS warps per SM on an
    H200's 132 SMs (never below the shared-memory minimum; none where that minimum takes
    more than a wave), and with 2 splits in one cluster (sm_90)."""
    if not MMA_KW_M[0] <= M <= MMA_KW_M[1]:
        return []
    strips, out = N // 64, []
    for kw, widths in MMA_KW.items():
        for wn in widths:
            if strips % wn:
                continue
            wave, low = (TARGET_BLOCKS // 2) * max(1, MMA_KW_WARPS // (wn * kw)), _min_splits(M, K)
            if strips // wn * low > wave:  # more than a wave at the fewest splits
                continue
            splits = _runs(K, max(low, min(K // 64, wave // (strips // wn))))
            out.append((wn, splits, 1, kw))
            if splits == 2 and clusters_supported():
                out.append((wn, 2, 2, kw))
    return out


def dependent_launch_capable(device: torch.device) -> bool:
    """Whether ``device`` can launch kernels as programmatic dependents (sm_90 and later),
    whatever ``GIFT_QUANT_PDL`` says."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_major(index) >= 9


def dependent_launch(device: torch.device) -> bool:
    """Whether the kernels launch on ``device`` as programmatic dependents of the kernel before
    them in the stream (sm_90 and later; ``GIFT_QUANT_PDL=0`` turns it off): such a launch may
    start while the previous kernel finishes, and reads its weights meanwhile; it waits for the
    previous kernel's writes (``griddepcontrol.wait``) before it reads x or touches its
    workspace, so results are those of an ordinary launch."""
    return os.environ.get("GIFT_QUANT_PDL", "1") != "0" and dependent_launch_capable(device)


# The warpgroup-MMA kernel (mixed_wg.cu, sm_90a): tiles of NT rows of x (WG_TILES), WGS
# warpgroups per block (each a 64-column strip, all sharing the block's x tile), K split where
# the tiles and column blocks make too few blocks. Two or four warpgroups with 16- to 128-row
# tiles (at most 128 registers a thread at four), two with 256-row tiles (128 accumulators).
# The rule takes 64 rows and up (WG_RULE_TILES); the 16- and 32-row tiles (WG_SMALL_TILES:
# a 16-row ring keeps more weight bytes in flight per SM than the tensor-core kernel's 8 warps
# at M = 16, round 54's profile) are timed where M takes at most two of them.
WG_TILES = (16, 32, 64, 128, 256)
WG_RULE_TILES = (64, 128, 256)
WG_SMALL_TILES = (16, 32)
WG_TARGET_BLOCKS = 132  # one block per SM of an H200


def _wg_widths(nt: int, N: int) -> list[int]:
    return [w for w in ((2,) if nt == 256 else (2, 4)) if (N // 64) % w == 0]


def _wg_tiles(M: int, N: int, nt: int, wgs: int) -> int:
    """Output tiles (blocks of one K split) of the warpgroup kernel: row tiles x column blocks."""
    return -(-M // nt) * (N // 64 // wgs)


def wg_choose(M: int, N: int, K: int) -> tuple[int, int, int]:
    """(rows per tile, warpgroups per block, K splits) of the warpgroup-MMA kernel by rule
    for a layer of N = 128 n columns: the smallest tile holding M rows (at most 256), two
    warpgroups, K split until about WG_TARGET_BLOCKS blocks, each split at least 4 k-steps."""
    nt = next((t for t in WG_RULE_TILES if M <= t), WG_RULE_TILES[-1])
    wgs = 2
    blocks = _wg_tiles(M, N, nt, wgs)
    splits = max(1, min(K // 64 // 4, -(-WG_TARGET_BLOCKS // blocks)))
    return nt, wgs, _runs(K, splits)


def wg_configs(M: int, N: int, K: int) -> list[tuple[int, int, int]]:
    """The warpgroup-MMA kernel's configurations worth timing for M rows: the rule's, then
    each tile of 64 rows and up to the first that holds M rows (none past the rule's at M <=
    16) and the 16- and 32-row tiles of which M takes one or two (more than half of one), at
    each block width, at 1, 2, 4 and 8 K splits (at least 4 k-steps each); none where N is not
    a multiple of 128."""
    if N % 128:
        return []
    out = [wg_choose(M, N, K)]
    top = next((i for i, t in enumerate(WG_RULE_TILES) if M <= t), len(WG_RULE_TILES) - 1)
    small = [t for t in WG_SMALL_TILES if t // 2 < M <= 2 * t]  # one or two row tiles
    big = WG_RULE_TILES[: top + 1] if M > WG_SMALL_TILES[0] else ()  # at M <= 16 the rule's
    for nt in [*small, *big]:
        for wgs in _wg_widths(nt, N):
            for splits in (1, 2, 4, 8):
                c = (nt, wgs, _runs(K, splits))
                if splits <= max(1, K // 64 // 4) and c not in out:
                    out.append(c)
    return out


# The warpgroup kernel's splits summed in one cluster, timed at first use: each configuration of
# ``wg_configs`` with at most 5 splits, and every other split count up to WG_CLUSTER_MAX (the
# portable cluster size) whose clusters the device holds all at once. Round 25 timed each
# configuration clustered against itself with atomics (kernels_h200_r25_wg_cluster.json.gz, both
# shape groups, W4 and W3, M = 32-512): 0.911x the time with 2 splits, 0.943x with 3, 1.054x
# with 4, 0.930x with 5 and 1.122x with 8 (never the fastest). Those 8-split launches needed
# more clusters than an H200 holds at once (cudaOccupancyMaxActiveClusters at 64 x 2, two
# blocks per SM: 132 clusters of 2, 62 of 4, 30 of 8; 4096^2 needs 32), so they ran in two
# waves. The counts that fit (up to 7 splits on 4096^2 at M = 64) took M = 64 to 0.951x the
# time and M = 32 to 0.981x (round 27). The split counts of ``wg_configs`` (1, 2, 4, 8 and the
# rule's) are clustered up to 5 splits whether or not the clusters fit: with long blocks
# (M = 256-512 on the large layers), clusters of 2-4 in waves stayed the fastest configuration
# in some cells. Every other count (3, 5, 6, 7, or 8 above) is timed only where they fit.
WG_CLUSTER_MAX = 8
WG_CLUSTER_WAVES = 5  # wg_configs' counts up to this many splits: clustered, fit or not


def wg_cluster_configs(
    M: int, N: int, K: int, max_clusters: Callable[[int, int, int], int]
) -> list[tuple[int, int, int, int]]:
    """(rows per tile, warpgroups, splits, cluster) of the warpgroup-MMA kernel with a tile's
    K splits summed in one thread-block cluster (sm_90): each configuration of ``wg_configs``
    with 2..WG_CLUSTER_WAVES splits, then each of its tiles and widths at every other split
    count up to WG_CLUSTER_MAX (at least 4 k-steps each) whose clusters, one per tile, the
    device holds at once (``max_clusters(nt, wgs, cluster)``: how many it holds). Tiling the
    splits with smaller clusters (then added by atomics) is not timed: for the swapped kernel
    it lost every comparison (MMV_CLUSTER's note)."""
    if not clusters_supported():
        return []
    plain = wg_configs(M, N, K)
    out = [(nt, wgs, s, s) for nt, wgs, s in plain if 1 < s <= WG_CLUSTER_WAVES]
    for nt, wgs in dict.fromkeys((nt, wgs) for nt, wgs, _ in plain):
        tiles = _wg_tiles(M, N, nt, wgs)
        for s in dict.fromkeys(_runs(K, s) for s in range(2, WG_CLUSTER_MAX + 1)):
            c = (nt, wgs, s, s)
            if c in out or not 1 < s <= max(1, K // 64 // 4):
                continue
            if tiles <= max_clusters(nt, wgs, s):
                out.append(c)
    return out


# The blocks' own salient gather (round 41): in 64-row tiles with salient columns, a launch
# whose blocks are all on the GPU at once may gather x's salient columns itself, a slice a
# block after the dependent wait, with the salient k-steps last, instead of a small gather
# launch before it (round 40's D1: that launch and its reads put 0.3-1.2 us on the chain at
# M = 32-64 on 4096^2 and 5120^2; on 12288x4096 and 28672x4096 the blocks' gather took
# 1.3-2.6% more time per configuration family). Timed at first use beside the same
# configuration with the launch, so each layer takes the faster. In clusters, the launch leaves
# an eighth of the clusters the device holds free (WG_GATHER_CLUSTER_SLACK): its clusters are
# placed while the kernel before it still holds SMs (programmatic dependent launch), and at the
# bound they need not all fit at once; the blocks that did start then spin the gather's bounded
# wait (20 us) before the others can. First use missed it: on an H100, 4096x14336 W4 at M = 64,
# `wg:64x2x7c7g` (32 clusters of 7, the device's bound) replayed at 24.5 us there and at 82.2
# us in the benchmark's graph (bf16 25.2 and 83.3); 32 clusters of 6 (of 39) and 40 of 5 (of
# 47) ran within 3% of their first-use times in the same runs, and so did 20 of 5 (of 22, 64 x 4
# tiles), which this rule drops (up to 4% slower without the gather there).
WG_GATHER_CLUSTER_SLACK = 8  # clusters left free: the device's count / this, rounded up


def wg_gather_fits(tiles: int, held: int) -> bool:
    """Whether ``tiles`` clusters may gather the salient columns themselves where the device
    holds ``held`` such clusters at once (WG_GATHER_CLUSTER_SLACK)."""
    return tiles <= held - -(-held // WG_GATHER_CLUSTER_SLACK)


def wg_gather_configs(
    M: int,
    N: int,
    K: int,
    wave_blocks: Callable[[int, int], int],
    max_clusters: Callable[[int, int, int], int],
) -> list[tuple[int, int, int, int, int, bool, bool]]:
    """(rows, warpgroups, splits, cluster, 1, False, True) of the warpgroup-MMA kernel: each
    configuration of ``wg_configs`` and ``wg_cluster_configs`` of 64 rows or fewer whose
    blocks the device holds all at once (``wave_blocks(nt, wgs)``; in clusters,
    ``max_clusters(nt, wgs, cluster)`` clusters, an eighth of them left free:
    ``wg_gather_fits``), with the blocks gathering the salient columns themselves."""
    plain = [(nt, wgs, s, 1) for nt, wgs, s in wg_configs(M, N, K)]
    out = []
    for nt, wgs, s, c in [*plain, *wg_cluster_configs(M, N, K, max_clusters)]:
        tiles = _wg_tiles(M, N, nt, wgs)
        if nt > 64 or tiles * s > wave_blocks(nt, wgs):
            continue
        if c == 1 or wg_gather_fits(tiles, max_clusters(nt, wgs, c)):
            out.append((nt, wgs, s, c, 1, False, True))
    return out


# A split tail (round 30): where a configuration's whole tiles fill W >= 1 waves of the device
# and leave R more, those R tiles run as `tail` K splits each (added by the atomics), so the
# last wave takes about a tail-th of a tile's time instead of a whole one. ncu on `wg:256x2x1`
# at 28672x4096 M = 512 (448 tiles, 3.39 waves of 132): the tensor pipe busy 71% of the
# kernel's cycles and 87% of the SMs' active ones; the SMs idle 18% of the time, in the fourth
# wave (ncu_h200_round30_wg256x2x1_m512.txt). Timed at 256-row tiles only: in round 30's
# full bench first use kept a tail in 3 cells, all `wg:256x2x1t2`, and in its
# configs_h200_r30_tail.json no 64- or 128-row tail was the fastest configuration of a cell.
WG_TAIL_MAX = 4
WG_TAIL_TILES = (256,)


def wg_tail_configs(
    M: int, N: int, K: int, wave_blocks: Callable[[int, int], int]
) -> list[tuple[int, int, int, int, int]]:
    """(rows per tile, warpgroups, 1, 1, tail) of the warpgroup-MMA kernel: each tile (of
    WG_TAIL_TILES) and width of ``wg_configs`` whose whole tiles fill at least one wave of the
    device (``wave_blocks(nt, wgs)``: the blocks it runs at once) and leave a partial one,
    with the tail count in 2..WG_TAIL_MAX (at least 4 k-steps a split) that makes the last
    wave shortest: ceil(R tail / wave) waves of 1 / tail of a tile. None where no count
    shortens it."""
    out = []
    for nt, wgs in dict.fromkeys((nt, wgs) for nt, wgs, _ in wg_configs(M, N, K)):
        tiles = _wg_tiles(M, N, nt, wgs)
        if nt not in WG_TAIL_TILES or tiles <= (wave := wave_blocks(nt, wgs)) or wave <= 0:
            continue
        last = tiles % wave
        counts = [t for t in range(2, WG_TAIL_MAX + 1) if -(-(K // 64) // t) >= 4]
        best = min(counts, key=functools.partial(_last_wave, last, wave), default=None)
        if last and best is not None and _last_wave(last, wave, best) < 1:
            out.append((nt, wgs, 1, 1, best))
    return out


def _last_wave(last: int, wave: int, tail: int) -> float:
    """The last wave's time, in tiles', of `last` tiles split `tail` ways on `wave` blocks
    at once: ceil(last tail / wave) waves of 1 / tail of a tile."""
    return -(-last * tail // wave) / tail


# Stream-K (round 31): a launch whose tiles leave the last wave of the device partial deals the
# tiles past its last whole wave but one (every tile, below two waves) out by k-steps over one
# wave of blocks, so that every SM gets the same number of k-steps; a tile shared by several
# blocks is summed by the block holding its first k-step from the others' partial tiles in the
# workspace. Round 30's split tail did this for the last wave only, with atomics, and kept
# most of its cost (a split 256-row tile took about a whole tile's time). Compiled for the
# tiles with a producer and two warpgroups (WG_STREAM_TILES).
WG_STREAM_TILES = ((128, 2), (256, 2))


def wg_stream_configs(
    M: int, N: int, K: int, wave_blocks: Callable[[int, int], int]
) -> list[tuple[int, int, int, int, int, bool]]:
    """(rows per tile, warpgroups, 1, 1, 1, True) of the warpgroup-MMA kernel with a stream-K
    schedule: each tile and width of ``wg_configs`` in WG_STREAM_TILES whose tiles do not fill
    whole waves of the device (``wave_blocks(nt, wgs)``: the blocks it runs at once)."""
    out = []
    for nt, wgs in dict.fromkeys((nt, wgs) for nt, wgs, _ in wg_configs(M, N, K)):
        if (nt, wgs) not in WG_STREAM_TILES or (wave := wave_blocks(nt, wgs)) <= 0:
            continue
        if _wg_tiles(M, N, nt, wgs) % wave:
            out.append((nt, wgs, 1, 1, 1, True))
    return out
