"""Tables, claims and plots of a recovery sweep's JSON (tools/sweep_recovery.py --report)."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_methods import CLAIMS, METHODS, budget_text  # noqa: E402


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan with one value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def groups(results: dict) -> dict[tuple, dict]:
    """(budget text, bits, method) -> {n, mean, std, and the means of the other figures};
    untrained rows have budget "-" and count for every budget."""
    by: dict[tuple, list[dict]] = {}
    for r in results["rows"]:
        k = r["key"]
        by.setdefault((budget_text(k), k["bits"], k["method"]), []).append(r)
    out = {}
    for gk, recs in by.items():
        mean, std = mean_std([r["perplexity"] for r in recs])
        g = {"n": len(recs), "mean": mean, "std": std, "records": recs}
        for field in ("step_seconds", "peak_gpu_mb", "peak_rss_mb", "trainable_params"):
            vals = [r[field] for r in recs if field in r]
            g[field] = statistics.fmean(vals) if vals else None
        g["bits_per_weight"] = recs[0]["bits_per_weight"]
        out[gk] = g
    return out


def fmt(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}" if not math.isnan(std) else f"{mean:.2f} (1 seed)"


def print_table(g: dict) -> None:
    order = {m: i for i, m in enumerate(METHODS)}
    print(
        f"\n{'budget':12s} {'bits':>4s} {'method':36s} {'n':>2s} {'perplexity':>17s} "
        f"{'s/step':>7s} {'peak MiB':>9s} {'trainable':>10s}"
    )
    for (budget, bits, method), s in sorted(
        g.items(), key=lambda kv: (kv[0][0], -kv[0][1], order.get(kv[0][2], 99), kv[0][2])
    ):
        label = METHODS[method][0] if method in METHODS else method
        step = f"{s['step_seconds']:7.3f}" if s["step_seconds"] is not None else " " * 7
        mem = peak_mb(s)
        mem = f"{mem:9.0f}" if mem else " " * 9
        par = f"{s['trainable_params']:10.0f}" if s["trainable_params"] is not None else " " * 10
        print(
            f"{budget:12s} {bits:4d} {label:36s} {s['n']:2d} {fmt(s['mean'], s['std']):>17s} "
            f"{step} {mem} {par}"
        )


def peak_mb(s: dict) -> float | None:
    """Peak GPU memory where the row ran on a GPU, else peak RSS."""
    return s["peak_gpu_mb"] or s["peak_rss_mb"]


def ratio_lines(g: dict) -> list[str]:
    """GIFT-SW post vs LoRA vs DoRA: step time and peak memory, relative to GIFT-SW."""
    lines = []
    for budget, bits, method in sorted(g):
        if method != "gift-post" or budget == "-":
            continue
        gift = g[(budget, bits, method)]
        for other in ("lora", "dora"):
            o = g.get((budget, bits, other))
            if o is None or not gift["step_seconds"] or not peak_mb(gift):
                continue
            what = "GPU" if gift["peak_gpu_mb"] else "RSS"
            lines.append(
                f"{budget} w{bits}: {other} / GIFT-SW step time "
                f"{o['step_seconds'] / gift['step_seconds']:.2f}x, peak {what} memory "
                f"{peak_mb(o) / peak_mb(gift):.2f}x"
            )
    return lines


def _lookup(g: dict, budget: str, bits: int, method: str) -> dict | None:
    return g.get((budget, bits, method)) or g.get(("-", bits, method))


def judge(g: dict, budget: str, comparisons: list[tuple[str, str, int]]) -> tuple[str, str]:
    """(our result, verdict) of one claim: each comparison 'lower should beat higher' holds
    when the difference of means exceeds twice its standard error over seeds, fails when it
    exceeds it the other way, and is within seed noise otherwise."""
    parts, verdicts, missing = [], [], []
    for low, high, bits in comparisons:
        a, b = _lookup(g, budget, bits, low), _lookup(g, budget, bits, high)
        if a is None or b is None:
            missing.append(f"w{bits} {low} vs {high}")
            continue
        diff = a["mean"] - b["mean"]
        se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
        if math.isnan(se):
            v = "one seed"
        elif abs(diff) <= 2 * se:
            v = "within seed noise"
        else:
            v = "holds" if diff < 0 else "fails"
        verdicts.append(v)
        parts.append(
            f"w{bits} {low} {fmt(a['mean'], a['std'])} vs {high} {fmt(b['mean'], b['std'])}: {v}"
        )
    if not verdicts:
        return "not run", "not run"
    if "fails" in verdicts:
        verdict = "disagrees"
    elif all(v == "holds" for v in verdicts):
        verdict = "agrees"
    else:
        verdict = "unclear"
    if missing:
        verdict += f" (partly run; not run: {', '.join(missing)})"
    return "; ".join(parts), verdict


def print_claims(g: dict) -> None:
    budgets = sorted({b for b, _, _ in g if b != "-"}) or ["-"]
    for budget in budgets:
        print(f"\npaper claim -> our result (mean ± std over seeds) -> verdict, budget {budget}")
        for i, (claim, comparisons) in enumerate(CLAIMS, 1):
            result, verdict = judge(g, budget, comparisons)
            print(f"{i}. {claim}\n   -> {result}\n   -> {verdict}")


def report(results: dict, out: Path) -> None:
    g = groups(results)
    print_table(g)
    lines = ratio_lines(g)
    if lines:
        print("\nstep time and peak memory relative to GIFT-SW post (same sweep):")
        print("\n".join(lines))
    print_claims(g)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("\nno plots: pip install 'gift_quant[plots]' (matplotlib)")
        return
    from plot_recovery import plot_curves, plot_pareto

    for path in (plot_curves(results, out), plot_pareto(results, out)):
        if path is not None:
            print(f"wrote {path}")
