"""Tables of a ``bench_kernels.py`` run, from its result dict alone (no GPU): the speed-up over
cuBLAS in the run's dtype per shape group (fraction of the byte floor, or markdown as in the
README), the fastest measured candidate and tinygemm beside ours, the issue's targets counted
on it, and the Triton route tables derived from the candidates; two runs compared
(``compare``: the same cells and candidate configurations timed before and after a change); and
a run over shapes that differ only in K split into a fixed and a per-k-step time (``k_sweep``).

    python3 tools/bench_kernels.py --markdown benchmarks/results/kernels_h200.json
    python3 tools/bench_kernels.py --compare BASE.json NEW.json
    python3 tools/bench_kernels.py --k-sweep benchmarks/results/kernels_h200_r26_k_sweep.json
"""

from __future__ import annotations

from statistics import geometric_mean, linear_regression

from provenance import read_json


def parse_shape(text: str, group: int = 128) -> tuple[int, int]:
    """``NxK`` (output x input features) of a layer the benchmark can build: N a multiple of 64,
    K of the quantization group; ValueError with what would be right otherwise."""
    try:
        N, K = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r}: write it as NxK, e.g. 28672x4096") from None
    if N <= 0 or N % 64 or K <= 0 or K % group:
        raise ValueError(
            f"shape {text!r}: N must be a positive multiple of 64 and K of the group ({group})"
        )
    return N, K


def best_candidates(res: dict, failing=()) -> dict:
    """{(N, K, bits, M): (us, name)}: the fastest measured candidate of each cell."""
    best = {}
    for r in res.get("cand", []):
        if r["name"] in failing:
            continue
        key = (r["N"], r["K"], r["bits"], r["M"])
        if key not in best or r["us"] < best[key][0]:
            best[key] = (r["us"], r["name"])
    return best


def routes_from(res: dict, failing=()) -> dict:
    """The ROUTES table (``routes``) that picks the fastest Triton candidate of every measured M
    (the tables serve where the CUDA kernel does not: its configurations are left out)."""
    mma = {r["name"] for r in res.get("cand", []) if r["name"].startswith("mma")}
    best = best_candidates(res, (*failing, *mma))
    out: dict = {}
    for N, K, bits, M in sorted(best):
        out.setdefault((N, K, bits), []).append((M, best[(N, K, bits, M)][1]))
    return {k: tuple(v) for k, v in out.items()}


def print_tables(res: dict, markdown: bool = False) -> None:
    """Per shape group (tuned, held out), a row per shape and bit width (ours; the best
    candidate where candidates were timed; tinygemm W4), a column per M; then the targets."""
    rows = {(r["N"], r["K"], r["bits"], r["M"]): r for r in res["rows"]}
    ms = sorted({k[3] for k in rows})
    bit_widths = sorted({k[2] for k in rows}, reverse=True)
    best = best_candidates(res)
    protocol = _protocol(res)

    def line(label: str, cells: list[str]) -> None:
        print(
            f"| {label} | " + " | ".join(cells) + " |"
            if markdown
            else f"  {label}: {' '.join(cells)}"
        )

    def ratio(c: dict | None, us: float | None) -> str:
        return f"{c['cublas_us'] / us:.2f}" if c and us else "–"

    for group in dict.fromkeys(r.get("shape_group", "tuned") for r in res["rows"]):
        shapes = dict.fromkeys(
            (r["N"], r["K"]) for r in res["rows"] if r.get("shape_group", "tuned") == group
        )
        print(
            f"\n{group} shapes: speed-up over cuBLAS {_dtype(res)}"
            + ("" if markdown else " (fraction of the byte floor)")
            + (f", timed {protocol}" if protocol != "burst" else "")
            + "\n"
        )
        if markdown:
            print("| shape (N×K) | kernel | " + " | ".join(f"M={M}" for M in ms) + " |")
            print("|---|---|" + "---|" * len(ms))
        for N, K in shapes:
            cells = {b: [rows.get((N, K, b, M)) for M in ms] for b in bit_widths}
            if not markdown:
                print(f"{N}×{K}: " + " ".join(f"M={M}" for M in ms))
            for b in bit_widths:
                fmt = "{speedup:.2f}" if markdown else "{speedup:.2f}({floor_frac:.0%})"
                line(
                    f"{N}×{K} | ours W{b}" if markdown else f"W{b}",
                    [fmt.format(**c) if c else "–" for c in cells[b]],
                )
            for b in bit_widths if best else ():
                got = [
                    ratio(c, best.get((N, K, b, M), (None,))[0])
                    for c, M in zip(cells[b], ms, strict=True)
                ]
                line(f"{N}×{K} | best candidate W{b}" if markdown else f"W{b} best candidate", got)
            tiny = [ratio(c, c.get("tinygemm_us") if c else None) for c in cells.get(4, [])]
            line(f"{N}×{K} | tinygemm W4" if markdown else "tinygemm", tiny)
    print_targets(rows, ms)
    print_first_use_gaps(res)


# How much slower than its first-use time a routed cell may run in the benchmark before the
# tables name it: the spread of a run is up to about 1.2x (long launches at M = 512 on the
# largest shapes; round 51), a configuration that misbehaves in the benchmark's longer graphs
# 3.3x (`wg:64x2x7c7g` at the cluster bound, round 51)
FIRST_USE_GAP = 1.3


def first_use_gaps(res: dict, factor: float = FIRST_USE_GAP) -> list[tuple]:
    """(bench / first-use time, N, K, bits, M, route, bench us, first-use us) of every row of
    a run whose routed kernel took more than ``factor`` times the time first use measured for
    it (the run's ``tuning`` record, matched by shape, bits, M bucket and dtype), slowest
    first: the first-use timing chose on a time the op does not run at."""
    from gift_quant.kernels.triton.tuning import m_bucket

    first = {
        (t["N"], t["K"], t["bits"], t["m_bucket"], t["dtype"]): t["seconds"]
        for t in res.get("tuning", [])
    }
    out = []
    for r in res["rows"]:
        key = (r["N"], r["K"], r["bits"], m_bucket(r["M"]), r.get("dtype", "fp16"))
        if r["M"] == 1 and key not in first:  # runs before one row had a bucket of its own
            key = (*key[:3], 2, key[4])
        seconds = first.get(key, {}).get(r["route"])
        if seconds and r["us"] > factor * seconds * 1e6:
            us = seconds * 1e6
            out.append((r["us"] / us, r["N"], r["K"], r["bits"], r["M"], r["route"], r["us"], us))
    return sorted(out, reverse=True)


def print_first_use_gaps(res: dict) -> None:
    if not res.get("tuning"):
        return
    gaps = first_use_gaps(res)
    print(
        f"- routed cells over {FIRST_USE_GAP}× their first-use time: {len(gaps)}"
        + "".join(
            f"\n  {N}×{K} W{b} M={M} {route}: {us:.2f} µs here, {fu:.2f} at first use ({g:.2f}×)"
            for g, N, K, b, M, route, us, fu in gaps
        )
    )


def print_targets(rows: dict, ms: list[int]) -> None:
    """The issue's targets counted on a run's rows {(N, K, bits, M): row}, with the cells that
    miss them."""
    r = list(rows.values())

    def cell(x: dict, value: float, m: bool = True) -> str:
        return f"{x['N']}×{x['K']} W{x['bits']}" + (f" M={x['M']}" if m else "") + f" {value:.2f}×"

    m1 = {(x["N"], x["K"]): x["speedup"] for x in r if x["M"] == 1 and x["bits"] == 4}
    below = [x for x in r if x["M"] <= 64 and x["speedup"] < 1.0]
    behind = [
        (x["us"] / rows[(N, K, 4, M)]["us"], x)
        for (N, K, b, M), x in rows.items()
        if b < 4 and M <= 64 and (N, K, 4, M) in rows and x["us"] > rows[(N, K, 4, M)]["us"]
    ]
    big = [x["speedup"] for x in r if 128 <= x["M"] <= 512]
    m16 = [x for x in r if x["M"] == 16]
    m16_short = [cell(x, x["speedup"], m=False) for x in m16 if x["speedup"] < 1.5]
    print("\nTargets on this run:")
    print("- M = 1, W4: " + ", ".join(f"{N}×{K} {v:.2f}×" for (N, K), v in m1.items()))
    print(
        f"- M = 16 ≥ 1.5×: {len(m16) - len(m16_short)} of {len(m16)} cells"
        + (f"; below: {', '.join(m16_short)}" if m16_short else "")
    )
    per_m = ", ".join(f"{sum(x['M'] == M for x in below)} at M = {M}" for M in ms if M <= 64)
    print(
        f"- below 1.0× at M ≤ 64: {len(below)} cells ({per_m})"
        + (": " + ", ".join(cell(x, x["speedup"]) for x in below) if below else "")
    )
    if big:
        short = sum(v < 0.9 for v in big)
        span = f"{min(big):.2f}–{max(big):.2f}×"
        print(f"- M = 128–512: {span}, {short} of {len(big)} cells below 0.9×")
    worst = max(behind, key=lambda t: t[0], default=None)
    print(
        f"- W3/W2 slower than W4 at M ≤ 64: {len(behind)} cells"
        + (f", by at most {cell(worst[1], worst[0])} W4's time" if worst else "")
    )


def _family(name: str) -> str:
    """A candidate's configuration without its K splits, "c" where they add up in clusters:
    "wg:128x2x4" -> "wg:128x2", "wg:64x2x8c8" -> "wg:64x2c", "mma:4x8c8" -> "mma:4c",
    "mma:2x4k4" -> "mma:2k4" (warps sharing a strip kept apart), "mmv:4x6d3" -> "mmv:4"; other
    names as they are."""
    cl = "c" if name.startswith(("wg:", "mma:", "mmv:")) and "c" in name.rsplit("x", 1)[1] else ""
    if name.startswith("wg:"):
        return name.rsplit("x", 1)[0] + cl
    if name.startswith(("mma:", "mmv:")):
        head, rest = name.split("x", 1)
        kw = (
            "k" + rest.split("k", 1)[1].split("c", 1)[0]
            if name.startswith("mma:") and "k" in rest
            else ""
        )
        return head + kw + cl
    return name


def compare(base: dict, new: dict) -> dict:
    """Time ratios new / base of two runs (geometric means over the cells both timed): the
    routed op ("rows") and cuBLAS per M (cuBLAS's ratio says how much the machine moved
    between the runs), each candidate configuration without its K splits per bit width (the
    same configuration in both builds: ``--candidates``), each cell's fastest candidate per M,
    and each routed cell's speed-up over cuBLAS in both runs ("speedup": cell -> (base, new))."""

    def cell(r: dict) -> tuple:
        return r["N"], r["K"], r["bits"], r["M"]

    out: dict = {}
    old_rows = {cell(r): r for r in base.get("rows", [])}
    for key, field in (("routed", "us"), ("cublas", "cublas_us")):
        per_m: dict = {}
        for r in new.get("rows", []):
            o = old_rows.get(cell(r))
            if o and r.get(field) and o.get(field):
                per_m.setdefault(r["M"], []).append(r[field] / o[field])
        out[key] = {m: geometric_mean(v) for m, v in sorted(per_m.items())}
    out["speedup"] = {
        cell(r): (
            old_rows[cell(r)]["cublas_us"] / old_rows[cell(r)]["us"],
            r["cublas_us"] / r["us"],
        )
        for r in new.get("rows", [])
        if cell(r) in old_rows
        and all(x.get(f) for x in (r, old_rows[cell(r)]) for f in ("us", "cublas_us"))
    }
    old_cand = {(*cell(c), c["name"]): c["us"] for c in base.get("cand", [])}
    fams: dict = {}
    for c in new.get("cand", []):
        o = old_cand.get((*cell(c), c["name"]))
        if o:
            fams.setdefault((_family(c["name"]), c["bits"]), []).append(c["us"] / o)
    out["candidates"] = {
        f"{f} W{b}": dict(cells=len(v), geomean=geometric_mean(v), min=min(v), max=max(v))
        for (f, b), v in sorted(fams.items())
    }
    old_best, new_best = best_candidates(base), best_candidates(new)
    per_m = {}
    for k, (us, _) in new_best.items():
        if k in old_best:
            per_m.setdefault(k[3], []).append(us / old_best[k][0])
    out["best_candidate"] = {m: geometric_mean(v) for m, v in sorted(per_m.items())}
    return out


def _dtype(res: dict) -> str:
    """The activations a run timed (``--dtype``); runs from before the option were fp16."""
    return res.get("env", {}).get("dtype", "fp16")


def _protocol(res: dict) -> str:
    """How a run timed its rows: "burst", or "sustained S s" (``--sustained``); runs from
    before the option were bursts."""
    return res.get("env", {}).get("protocol", "burst")


def print_comparison(base: dict, new: dict) -> dict:
    """:func:`compare`, printed; returns it."""
    got = compare(base, new)
    commits = [
        run["rows"][0].get("commit", "?")[:7] if run.get("rows") else "?" for run in (base, new)
    ]
    print(f"time ratio new / base ({commits[1]} / {commits[0]}), geometric mean")
    protocols = [_protocol(run) for run in (base, new)]
    if protocols[0] != protocols[1]:
        print(
            f"  timed differently: base {protocols[0]}, new {protocols[1]}: the ratios are the "
            "protocol's as well as the kernels' (cuBLAS's ratio shows the protocol's share)"
        )
    dtypes = [_dtype(run) for run in (base, new)]
    if dtypes[0] != dtypes[1]:
        print(
            f"  different activations: base {dtypes[0]}, new {dtypes[1]}: each side's speed-up "
            "is over its own cuBLAS"
        )
    if not got["speedup"] and not any(got[k] for k in ("routed", "cublas", "best_candidate")):
        print("  no cell (N, K, bits, M) was timed in both runs: nothing to compare")
    for key in ("routed", "cublas", "best_candidate"):
        if got[key]:
            print(f"  {key}: " + " ".join(f"M={m} {r:.3f}" for m, r in got[key].items()))
    if got["candidates"]:
        print("  same configuration (cells, geomean, min, max):")
        for name, s in got["candidates"].items():
            print(f"    {name}: {s['cells']} {s['geomean']:.3f} {s['min']:.3f} {s['max']:.3f}")
    print_speedups(got["speedup"], "/".join(dict.fromkeys(dtypes)))
    return got


# the targets' floors: (label, the M it spans, speed-up over cuBLAS)
SPEEDUP_FLOORS = (("M ≤ 64", range(1, 65), 1.0), ("M = 128–512", range(128, 513), 0.9))


def print_speedups(speedup: dict, dtype: str = "fp16") -> None:
    """The routed cells' speed-ups over cuBLAS base -> new: at W4 a markdown table (a row per
    shape, a column per M), and at every width the cells below the targets' floors (1.0x up to
    M = 64, 0.9x at M = 128-512) in each run."""
    w4 = {k: v for k, v in speedup.items() if k[2] == 4}
    if w4:
        ms = sorted({k[3] for k in w4})
        print(f"\nW4 speed-up over cuBLAS {dtype}, base -> new:\n")
        print("| shape | " + " | ".join(f"M={m}" for m in ms) + " |")
        print("|---|" + "---|" * len(ms))
        for N, K in dict.fromkeys((k[0], k[1]) for k in w4):
            cells = (w4.get((N, K, 4, m)) for m in ms)
            text = [f"{c[0]:.2f} → {c[1]:.2f}" if c else "–" for c in cells]
            print(f"| {N}×{K} | " + " | ".join(text) + " |")
    for label, span, floor in SPEEDUP_FLOORS:
        cells = [v for k, v in speedup.items() if k[3] in span]
        if cells:
            base, new = (sum(c[i] < floor for c in cells) for i in (0, 1))
            print(f"cells below {floor}× at {label}: base {base}, new {new} of {len(cells)}")


def k_sweep(res: dict) -> dict:
    """A candidate run over shapes that differ only in K (``--shape NxK`` repeated), per (N, M,
    bits): cuBLAS's time and the fastest candidate at each K, and each candidate's times fitted
    as fixed + per_step * K / 64 (least squares over the K it was timed at; at least three).
    Without K splits per_step is one block's k-step, and fixed includes the salient k-steps."""
    best = best_candidates(res)
    cublas = {(r["N"], r["K"], r["bits"], r["M"]): r.get("cublas_us") for r in res.get("cand", [])}
    times: dict = {}  # (N, M, bits) -> name -> [(K / 64, us)]
    for r in res.get("cand", []):
        points = times.setdefault((r["N"], r["M"], r["bits"]), {}).setdefault(r["name"], [])
        points.append((r["K"] / 64, r["us"]))
    out = {}
    for (N, M, bits), by_name in sorted(times.items()):
        ks = sorted(k for n, k, b, m in best if (n, m, b) == (N, M, bits))
        if len(ks) < 3:
            continue
        fits = {}
        for name, points in sorted(by_name.items()):
            if len({x for x, _ in points}) >= 3:
                per_step, fixed = linear_regression([x for x, _ in points], [y for _, y in points])
                fits[name] = {"fixed_us": fixed, "per_step_us": per_step, "ks": len(points)}
        rows = {
            k: (best[N, k, bits, M][1], best[N, k, bits, M][0], cublas[N, k, bits, M]) for k in ks
        }
        out[N, M, bits] = {"best": rows, "fits": fits}
    return out


def print_k_sweep(res: dict) -> dict:
    """``k_sweep`` as markdown: per (N, M, bits) a row per K (cuBLAS, the fastest candidate),
    then each candidate's fixed and per-k-step time, smallest fixed first."""
    sweep = k_sweep(res)
    if not sweep:
        print("no (N, M, bits) of this run was timed at three K or more (--shape NxK, repeated)")
    for (N, M, bits), got in sweep.items():
        print(f"\n### N = {N}, M = {M}, W{bits}\n")
        print("| K | cuBLAS (us) | fastest candidate | its time (us) |")
        print("|---:|---:|---|---:|")
        for k, (name, us, cublas) in got["best"].items():
            cb = "–" if cublas is None else f"{cublas:.1f}"
            print(f"| {k} | {cb} | {name} | {us:.1f} |")
        print("\n| candidate | K timed | fixed (us) | per k-step of K (us) |")
        print("|---|---:|---:|---:|")
        for name, f in sorted(got["fits"].items(), key=lambda t: t[1]["fixed_us"]):
            print(f"| {name} | {f['ks']} | {f['fixed_us']:.2f} | {f['per_step_us']:.3f} |")
    return sweep


def show_saved(markdown: str | None, compare: list[str] | None, sweep: str | None) -> bool:
    """``bench_kernels``' views of saved runs (``--markdown FILE``, ``--compare BASE NEW``,
    ``--k-sweep FILE``): print the one asked for; False where none was."""

    if markdown:
        print_tables(read_json(markdown), markdown=True)
    elif compare:
        print_comparison(*map(read_json, compare))
    elif sweep:
        print_k_sweep(read_json(sweep))
    return bool(markdown or compare or sweep)
