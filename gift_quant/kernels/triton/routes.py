"""Which kernel serves M rows of a quantized layer: the rules and the tables measured on the
H200 (names only; ``ops`` launches what they name).

* Kernel names: "gemv" (split-K GEMV by its rule; "gemv:BKxS": k-tile BK, S splits),
  "mm:<MM_CONFIGS key>" (the Triton tensor-core kernel), "cublas" (dequantize + cuBLAS),
  "mma:WNxS[kKW][cC]" (the CUDA tensor-core kernel with WN 64-column strips per block and S
  K-splits, where it is built; KW warps per strip, each a
  share of the block's k-steps, M <= 16) and "mmv:WNxS[dD][cC]" (the CUDA
  kernel with the operands swapped, M <= 16; D x 16 bytes of weights per lane in its ring,
  default ``rules.MMV_DEPTH``); C > 1: the splits summed in thread-block clusters of C blocks
  (sm_90); "wg:NTxWxS[cC][tT][s|g]" (the warpgroup-MMA kernel, sm_90a: tiles of NT rows of x, W
  warpgroups per block, S K-splits, summed in clusters of C blocks; T > 1: the tiles past the
  device's last whole wave as T K splits each; s: a stream-K schedule, the tiles of the last
  waves dealt out by k-steps; g: the blocks gather x's salient columns themselves instead of
  a gather launch before them; chosen only by measurement).
* By rule (``route``): "mmv" for M in MMV_M, and for M in MMV_WIDE_M on wide layers (where
  the CUDA kernels are built); else the GEMV (M <= GEMV_MAX_M); dequantize + cuBLAS (M >=
  CUBLAS_MIN_M); between, ``ROUTES`` per (N, K, bits), measured on the H200 and shipped with
  the code (docs/KERNELS-NOTES.md), or ``DEFAULT_ROUTES``.
* Measured at first use (fp16 or bf16, M in TUNE_M where the CUDA kernels are built, M in
  WG_M where the warpgroup kernel is, and the GEMV's configurations "gemv:BKxS" at M <=
  GEMV_TUNED_M everywhere: ``timed``): ``dispatch.tuned_route`` times ``tuning_names``
  once per shape, M bucket and dtype (``tuning``);
  ``route_in_force`` says which kernel a call takes now.
"""

from __future__ import annotations

import torch

from gift_quant.kernels.cuda import native, rules
from gift_quant.kernels.triton import tuning
from gift_quant.kernels.triton.gemv import MAX_M as GEMV_LIMIT
from gift_quant.kernels.triton.gemv import TUNED_M as GEMV_TUNED_M
from gift_quant.kernels.triton.gemv import gemv_names

__all__ = [
    "CUBLAS_MIN_M",
    "DEFAULT_ROUTES",
    "GEMV_MAX_M",
    "ROUTES",
    "TUNE_M",
    "candidates",
    "mma_config",
    "mma_name",
    "mmv_name",
    "route",
    "route_in_force",
    "timed",
    "tuning_names",
    "wg_name",
]

GEMV_MAX_M = 4  # M <= this: the decode GEMV, whatever the tables say (but see MMV_M)
# fp16, where the CUDA kernels (kernels/cuda) are built, by rule: the swapped kernel "mmv" for
# M = 2..8 (its rule beat the routes in force in all 48 cells at M = 4 and 8 and in 18 of 24
# at M = 2: benchmarks/results/sweep_mmv_h200_m248.json.gz; at M = 1 the GEMV stays, 1.6% from
# the faster of the two on average against 6.9% for "mmv": sweep_mmv_h200_m1.json.gz), and for
# M = 9..16 (two 8-row tiles of x) on layers of at least MMV_WIDE_WEIGHTS weights: its best
# configuration beat the routes then in force ("mma" by rule, or the first-use choice) in 30 of
# 36 cells of the six wide benchmark shapes at M = 12 and 16, and its rule is that configuration
# in every cell where the rule's was measured (sweep_mmv_h200_m12_16.json.gz). On 4096 x 4096 the
# Triton kernel was faster in 5 of 6 cells; on 5120 x 5120 (below the bound too) "mmv" won 5 of
# 6, and the first-use timing, which includes it, finds that.
MMV_M = (2, 8)
MMV_WIDE_M = (9, 16)
MMV_WIDE_WEIGHTS = 1 << 25
# M where the kernels are measured at first use: 2..32, where the CUDA kernels beat the
# Triton kernels on the largest layers and lost on some others. Not M = 33..64: timed there
# (round 16, clustered configurations included) the tensor-core kernel's best took 1.26-1.55x
# the Triton route's time in all 24 cells (kernels_h200_r16a.json.gz). M = 2 since round 22: by
# rule the swapped kernel served it, and in bf16 (b1bd854) the GEMV it replaced was up to 24%
# faster on some shapes (the graph timing of round 15 had never been tried there; the single
# launch after a flush it replaced had misread kernels at M <= 2, docs/KERNELS-NOTES.md,
# round 8). Not M = 1: the GEMV by rule, 1.6% from the faster of the two on average
TUNE_M = 2, 32
CUBLAS_MIN_M = 513  # M >= this: dequantize + cuBLAS
# M where the warpgroup-MMA kernel's configurations are timed at first use beside the other
# candidates, where it is built (sm_90a, N a multiple of 128). Not by rule: its best
# configuration varies by shape (round 17: the rule's took up to 1.5x the best one's time) and
# the table's route stays the faster at some shapes. From 9 rows (the bucket 9..16, in its
# 16-row tiles, rows past M zero-filled by the tensor copy; 17..32 in 16-, 32- and 64-row
# tiles): at 1174be4 its M = 64 time was below the M = 32 route's in 8 fp16 cells. Not past
# 512 rows, where dequantizing for cuBLAS pays (compute-bound, cuBLAS at about twice the
# kernel's MMA rate).
WG_M = (9, 512)

# Route tables: (largest M, kernel) per M bucket, for M in GEMV_MAX_M + 1 .. CUBLAS_MIN_M - 1.
# Kernel names: "gemv", "cublas" (dequantize + cuBLAS), "mm:<MM_CONFIGS key>". Made by
# tools/bench_kernels.py ``routes_from`` from the candidate timings in
# benchmarks/results/kernels_h200_candidates.json.gz (fastest candidate per measured M = 8, 16,
# ..., 512), then "mm:t64k" (timed later, kernels_h200.json) where it was faster by more than
# 3%. The defaults (other shapes) take per M the candidate with the best geometric-mean
# speedup over the measured shapes. M = 33-64: "mm:t128wr" where it was more than 3% faster
# than the kernel routed before, and as the default (over the tuned shapes its geometric mean
# was 0.87x cuBLAS at each bit width, t128w's 0.83-0.87x; kernels_h200_cand_m64.json).
_R = tuple[tuple[int, str], ...]
_T64_CUBLAS: _R = ((32, "mm:t64"), (64, "mm:t128w"), (128, "mm:t64"), (512, "cublas"))
_T64_CUBLAS_R: _R = ((32, "mm:t64"), (64, "mm:t128wr"), (128, "mm:t64"), (512, "cublas"))
DEFAULT_ROUTES: dict[int, _R] = {
    4: ((16, "mm:t64k"), (32, "mm:t64"), (64, "mm:t128wr"), (128, "mm:t64"), (512, "cublas")),
    3: _T64_CUBLAS_R,
    2: ((32, "mm:t64k"), (64, "mm:t128wr"), (128, "mm:t64"), (512, "cublas")),
}
ROUTES: dict[tuple[int, int, int], _R] = {  # (N, K, bits) -> routes
    (4096, 4096, 4): ((32, "mm:t64k"), (64, "mm:t128w"), (512, "cublas")),
    (4096, 4096, 3): ((32, "mm:t64"), (64, "mm:t128w"), (512, "cublas")),
    (4096, 4096, 2): ((32, "mm:t64k"), (64, "mm:t128w"), (512, "cublas")),
    (12288, 4096, 4): ((8, "gemv"), (16, "mm:t64k"), (32, "mm:t128s"), (64, "mm:t128wr"))
    + ((128, "mm:t64"), (512, "cublas")),
    (12288, 4096, 3): ((32, "mm:t64"), (64, "mm:t128wr"), (128, "mm:t64"), (512, "cublas")),
    (12288, 4096, 2): ((32, "mm:t128s"), (64, "mm:t128wr"), (128, "mm:t64"), (512, "cublas")),
    (28672, 4096, 4): ((8, "gemv"), (16, "mm:t64k"), (32, "mm:t128s"), (64, "mm:t128w"))
    + ((128, "mm:t64"), (512, "cublas")),
    (28672, 4096, 3): _T64_CUBLAS,
    (28672, 4096, 2): ((16, "mm:t128"), (32, "mm:t128s"), (64, "mm:t128w"), (128, "mm:t64"))
    + ((512, "cublas"),),
    (4096, 14336, 4): ((8, "gemv"), (16, "mm:n128"), (32, "mm:t64"), (64, "mm:t128w"))
    + ((128, "mm:t64"), (512, "cublas")),
    (4096, 14336, 3): _T64_CUBLAS_R,
    (4096, 14336, 2): _T64_CUBLAS_R,
}


def route(M: int, N: int = 0, K: int = 0, bits: int = 0, mma: bool = False) -> str:
    """Which kernel serves M rows of an (N, K, bits) layer by rule, without measuring (names:
    see the module docstring; "mmv:..." and "mma:...", the CUDA kernels, only where ``mma``
    says they can serve the call)."""
    if mma and MMV_M[0] <= M <= MMV_M[1]:
        return mmv_name(*rules.mmv_choose(M, N, K))
    if mma and MMV_WIDE_M[0] <= M <= MMV_WIDE_M[1] and N * K >= MMV_WIDE_WEIGHTS:
        return mmv_name(*rules.mmv_choose(M, N, K))
    if M <= GEMV_MAX_M:
        return "gemv"
    if M >= CUBLAS_MIN_M:
        return "cublas"
    table = ROUTES.get((N, K, bits)) or DEFAULT_ROUTES.get(bits, DEFAULT_ROUTES[4])
    for m_max, name in table:
        if M <= m_max and (name != "gemv" or M <= GEMV_LIMIT):
            return name
    return "cublas"


def mma_name(wn: int, splits: int, cluster: int = 1, kw: int = 1) -> str:
    return (
        f"mma:{wn}x{splits}"
        + ("" if kw == 1 else f"k{kw}")
        + ("" if cluster == 1 else f"c{cluster}")
    )


def mmv_name(wn: int, splits: int, depth: int = rules.MMV_DEPTH, cluster: int = 1) -> str:
    return (
        f"mmv:{wn}x{splits}"
        + ("" if depth == rules.MMV_DEPTH else f"d{depth}")
        + ("" if cluster == 1 else f"c{cluster}")
    )


def wg_name(
    nt: int,
    wgs: int,
    splits: int,
    cluster: int = 1,
    tail: int = 1,
    stream_k: bool = False,
    gather: bool = False,
) -> str:
    return (
        f"wg:{nt}x{wgs}x{splits}"
        + ("" if cluster == 1 else f"c{cluster}")
        + ("" if tail == 1 else f"t{tail}")
        + ("s" if stream_k else "")
        + ("g" if gather else "")
    )


def mma_config(name: str) -> tuple[int, ...]:
    """(strips per block, K splits, cluster, warps per strip) of "mma:WNxS[kKW][cC]"; (warps,
    splits, depth, cluster)
    of "mmv:WNxS[dD][cC]"; (rows per tile, warpgroups, splits, cluster, tail splits,
    stream-K, the blocks' own salient gather) of "wg:NTxWxS[cC][tT][s|g]"."""
    if name.startswith("wg:"):
        nt, wgs, rest = name[3:].split("x")
        gather = rest.endswith("g")
        rest = rest.removesuffix("g")
        stream_k = rest.endswith("s")
        rest, _, tail = rest.removesuffix("s").partition("t")
        splits, _, cluster = rest.partition("c")
        return int(nt), int(wgs), int(splits), int(cluster or 1), int(tail or 1), stream_k, gather
    wn, rest = name[4:].split("x")
    rest, _, cluster = rest.partition("c")
    splits, _, depth = rest.partition("d")
    if name.startswith("mmv:"):
        return int(wn), int(splits), int(depth or rules.MMV_DEPTH), int(cluster or 1)
    splits, _, kw = splits.partition("k")
    return int(wn), int(splits), int(cluster or 1), int(kw or 1)


def _wg_serves(M: int, wg: bool) -> bool:
    """Whether the warpgroup kernel's configurations are among the kernels for M rows (``wg``:
    it is built)."""
    return wg and WG_M[0] <= M <= WG_M[1]


def _wg_names(M: int, N: int, K: int) -> list[str]:
    """The warpgroup kernel's configurations for M rows: ``rules.wg_configs``, those with
    their splits in one cluster (``rules.wg_cluster_configs``, sm_90), those whose last,
    partial wave of tiles runs split (``rules.wg_tail_configs``), those that share the
    tiles of a partial wave by k-steps (``rules.wg_stream_configs``), then the 64-row ones
    whose blocks gather the salient columns themselves (``rules.wg_gather_configs``)."""
    confs = [
        *rules.wg_configs(M, N, K),
        *rules.wg_cluster_configs(M, N, K, native.wg_max_clusters),
        *rules.wg_tail_configs(M, N, K, native.wg_wave_blocks),
        *rules.wg_stream_configs(M, N, K, native.wg_wave_blocks),
        *rules.wg_gather_configs(M, N, K, native.wg_wave_blocks, native.wg_max_clusters),
    ]
    return [wg_name(*c) for c in confs]


def timed(M: int, N: int, wg: bool, mma: bool = True) -> bool:
    """Whether calls of M rows on N columns (fp16 or bf16) are timed at first use: where the
    CUDA kernels are built (``mma``; ``wg``: the warpgroup kernel too) M in TUNE_M and WG_M,
    and at any rate the GEMV's configurations at M <= GEMV_TUNED_M."""
    if M <= GEMV_TUNED_M:
        return True
    return mma and (TUNE_M[0] <= M <= TUNE_M[1] or (_wg_serves(M, wg) and N % 128 == 0))


def tuning_names(
    M: int, N: int, K: int, bits: int, wg: bool = False, group: int = 128, mma: bool = True
) -> list[str]:
    """The kernels timed for M rows at first use (``mma``: where the CUDA kernels can serve
    the call): the swapped kernel's configurations (M <= 16; with clusters where they may pay), the
    tensor-core kernel's (with its splits in one cluster too, ``rules.mma_cluster_configs``,
    and with warps sharing a strip, ``rules.mma_kw_configs``),
    the warpgroup kernel's (``_wg_names``, M in WG_M, where ``wg`` says it is built)
    and the Triton rule; past 32 rows (``timed`` with the warpgroup kernel) only the warpgroup
    kernel's configurations and the table's route. Where the rule is the GEMV (M <=
    GEMV_TUNED_M), its other configurations (``gemv.gemv_names``, for quantization groups of
    ``group``) follow it; without the CUDA kernels (``mma`` false) only those are timed."""
    gemvs = ["gemv", *gemv_names(M, N, K, group)]
    if not mma or M < TUNE_M[0]:
        return gemvs
    wgs = _wg_names(M, N, K) if _wg_serves(M, wg) else []
    if M > TUNE_M[1]:
        return [*wgs, route(M, N, K, bits)]
    names = []
    if M <= rules.MMV_MAX_M:
        names += [mmv_name(*c) for c in rules.mmv_configs(M, N, K)]
        names += [mmv_name(*c) for c in rules.mmv_cluster_configs(M, N, K)]
    names += [mma_name(*c) for c in rules.configs(M, N, K)]
    names += [mma_name(*c) for c in rules.mma_cluster_configs(M, N, K)]
    names += [mma_name(*c) for c in rules.mma_kw_configs(M, N, K)]
    rule = route(M, N, K, bits)
    return [*names, *wgs, *(gemvs if rule == "gemv" and M <= GEMV_TUNED_M else [rule])]


def route_in_force(
    M: int,
    N: int,
    K: int,
    bits: int,
    group: int,
    nsal: int,
    mma: bool,
    device: int | None = 0,
    wg: bool = False,
    *,
    dtype: torch.dtype,
) -> str:
    """The kernel calls of M rows with ``dtype`` activations take now: the measured choice
    where one was made (``timed``, as ``tuned_route``; ``wg``: the warpgroup kernel is built),
    else ``route``'s rule (what the tools record as the routes in force)."""
    kept = timed(M, N, wg, mma)
    k = tuning.key(device, N, K, bits, group, nsal, M, dtype, mma)
    measured = tuning.kept(k) if kept else None
    return measured or route(M, N, K, bits, mma)


def candidates(
    M: int, mma: bool = False, N: int = 0, K: int = 0, wg: bool = False, group: int = 128
) -> list[str]:
    """The kernels the route tables choose among for M rows (measured by
    ``tools/bench_kernels.py --candidates``, checked by ``tools/check_kernels.py``); with
    ``mma``, the CUDA kernels too, in every configuration ``tuned_route`` may time for the
    (N, K) layer, and the swapped kernel's rule at each depth; with ``wg``, the warpgroup-MMA
    kernel's configurations (``_wg_names``) for M in WG_M. At M <= GEMV_TUNED_M, given N and
    K, the GEMV's configurations for quantization groups of ``group`` (``gemv.gemv_names``)
    follow "gemv", with or without ``mma``."""
    if _wg_serves(M, wg):
        return [*candidates(M, mma, N, K, group=group), *_wg_names(M, N, K)]
    if mma and M <= rules.MAX_M:
        out = [*candidates(M, N=N, K=K, group=group)]
        out += [mma_name(*c) for c in rules.configs(M, N, K)]
        out += [mma_name(*c) for c in rules.mma_cluster_configs(M, N, K)]
        out += [mma_name(*c) for c in rules.mma_kw_configs(M, N, K)]
        if M <= rules.MMV_MAX_M:
            out += [mmv_name(*c) for c in rules.mmv_configs(M, N, K)]
            out += [mmv_name(*c) for c in rules.mmv_cluster_configs(M, N, K)]
            rule = rules.mmv_choose(M, N, K)
            out += [mmv_name(*rule, d) for d in rules.MMV_DEPTHS if d != rules.MMV_DEPTH]
        return out
    if M <= GEMV_MAX_M:
        return ["gemv", *(gemv_names(M, N, K, group) if N and K else [])]
    if M >= CUBLAS_MIN_M:
        return ["cublas"]
    out = ["gemv"] if M <= GEMV_LIMIT else []
    if M <= 32:
        out += ["mm:t128", "mm:t128s", "mm:t64", "mm:n128", "mm:t64k"]
    elif M <= 64:
        out += ["mm:t128w", "mm:t64", "mm:t128wr"]
    else:
        out.append("mm:t64")
    if M >= 32:
        out.append("cublas")
    return out
