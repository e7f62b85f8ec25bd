"""The GEMV configurations ``bench_kernels.py --sweep`` times beside the rule's (M <= 4): other
splits, tiles, stages and register caps. ``n_split`` is a run-time argument (no recompilation);
a cap (``maxnreg``) compiles anew."""

from __future__ import annotations

import triton

from gift_quant.kernels.triton.gemv import PROGRAMS_PER_SM, SAL_PER_PROG, gemv_config


def gemv_variants(
    M: int, N: int, K: int, bits: int, group: int, nsal: int, sms: int
) -> list[tuple[str, dict]]:
    """(name, configuration) pairs, the rule's first as "gemv default", each configuration
    once; a cap a variant inherits from the rule is named."""
    if M > 4:
        return []
    base = gemv_config(M, N, K, bits, group, nsal, sms)
    uncapped = {k: v for k, v in base.items() if k != "maxnreg"}
    places, sal = PROGRAMS_PER_SM * sms, triton.cdiv(nsal, SAL_PER_PROG)
    out = [("gemv default", base)]
    for f in (0.5, 2.0):
        out.append((f"gemv split x{f}", {**base, "n_split": max(1, int(base["n_split"] * f))}))
    out.append(("gemv stages=2", {**base, "num_stages": 2}))
    if M == 1:
        wide = {**base, "BLOCK_N": 256, "BLOCK_K": 64, "n_split": base["n_split"]}
        out.append(("gemv bn=256 bk=64", wide))
        out.append(("gemv bn=256 w2", {**wide, "BLOCK_K": 128, "num_warps": 2}))
        out.append(("gemv split x4", {**base, "n_split": base["n_split"] * 4}))
        half = max(1, base["n_split"] // 2)
        out.append(("gemv split x0.5 stages=2", {**base, "n_split": half, "num_stages": 2}))
        out.append(("gemv bn=64 split x0.5", {**base, "BLOCK_N": 64, "n_split": half}))
        out.append(("gemv bn=64", {**base, "BLOCK_N": 64}))
        out.append(("gemv bn=64 maxnreg=80", {**base, "BLOCK_N": 64, "maxnreg": 80}))
        wave64 = min(K // base["BLOCK_K"], places // triton.cdiv(N, 64) - sal)
        out.append(("gemv bn=64 one wave", {**uncapped, "BLOCK_N": 64, "n_split": wave64}))
        for bk in (128, 64, 32):  # the rule picks 128 or 64; fewer registers per program
            out.append((f"gemv bk={bk}", {**base, "BLOCK_K": bk}))
            split2 = {**base, "BLOCK_K": bk, "n_split": 2 * base["n_split"]}
            out.append((f"gemv bk={bk} split x2", split2))
    if M == 2:
        out.append(("gemv bk=32", {**base, "BLOCK_K": 32}))
    # even shares: the rule's split count divides the k-blocks only by chance (round 53: on
    # 5120^2 and at M = 2 on 4096^2 the uneven launches took up to 1.4x an even one's time)
    for bk in (128, 64) if M == 1 else (64, 32):
        n_kb = K // bk
        if group % bk or n_kb == 0:
            continue
        divisors = [s for s in range(1, n_kb + 1) if n_kb % s == 0]
        below = max(s for s in divisors if s <= base["n_split"])
        above = [s for s in divisors if base["n_split"] < s <= 1.3 * base["n_split"]]
        for s in [below] + above[:1]:
            out.append((f"gemv bk={bk} even x{s}", {**base, "BLOCK_K": bk, "n_split": s}))
    if base.get("maxnreg"):
        out.append(("gemv uncapped", uncapped))
        one_wave = max(1, places // triton.cdiv(N, base["BLOCK_N"]) - sal)
        out.append(("gemv uncapped one wave", {**uncapped, "n_split": one_wave}))
    for cap in (80, 72, 64):  # registers per thread: 96 uncapped, 21 one-warp programs/SM
        out.append((f"gemv maxnreg={cap}", {**base, "maxnreg": cap}))
        split2 = {**base, "maxnreg": cap, "n_split": 2 * base["n_split"]}
        out.append((f"gemv maxnreg={cap} split x2", split2))
    unique: list[tuple[str, dict]] = []  # a variant the rule already takes is timed once
    for name, cfg in out:
        if cfg.get("maxnreg") and "maxnreg" not in name and cfg is not base:  # inherited cap
            name += f" maxnreg={cfg['maxnreg']}"
        if all(cfg != c for _, c in unique):
            unique.append((name, cfg))
    return unique
