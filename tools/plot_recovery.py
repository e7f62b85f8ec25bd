"""Plots of a recovery sweep's JSON (tools/sweep_recovery.py), saved as PNG next to it.

    python tools/plot_recovery.py FILE.json

FILE_curves.png: held-out perplexity against training tokens, one panel per bit width, one line
per method (mean over seeds; pre-mode curves are the FP model while it trains: quantization
comes after their last point, and only the table has the result). A panel whose values span more
than a decade has a log axis. FILE_pareto.png: final perplexity against bits per weight for RTN,
GPTQ, GPTQ + salient columns (gift and owq metrics) and + GIFT-SW with 6-bit noise from each
(largest budget), FP16 as a line. Needs the [plots]
extra (matplotlib).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, NullFormatter  # noqa: E402

PARETO = [
    ("rtn", "RTN"),
    ("gptq", "GPTQ"),
    ("base", "GPTQ + 3% salient (gift metric)"),
    ("gift-owq (before training)", "GPTQ + 3% salient (owq metric)"),
    ("gift-post-b6", "+ GIFT-SW (gift metric, 6-bit noise)"),
    ("gift-owq-b6", "+ GIFT-SW (default: owq metric, 6-bit noise)"),
]


def _budget(key: dict) -> str | None:
    return f"{key['steps']}x{key['batch']}x{key['seq_len']}" if "steps" in key else None


def _largest(budgets) -> str | None:
    def tokens(b):
        steps, batch, seq = (int(x) for x in b.split("x"))
        return steps * batch * seq

    return max(budgets, key=tokens) if budgets else None


def mean_curve(curves: list[list[list[float]]]) -> tuple[list[float], list[float]]:
    """Pointwise mean of the seeds' curves over the points they all have (same schedule)."""
    n = min(len(c) for c in curves)
    xs = [curves[0][i][0] for i in range(n)]
    ys = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
    return xs, ys


def plot_curves(results: dict, json_path: Path) -> Path | None:
    rows = [r for r in results["rows"] if r.get("curve")]
    if not rows:
        return None
    budgets = sorted({_budget(r["key"]) for r in rows})
    bits_list = sorted({r["key"]["bits"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(bits_list), figsize=(5.5 * len(bits_list), 4.2), squeeze=False)
    # one colour per method in every panel
    methods = sorted({r["key"]["method"] for r in rows})
    colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, bits in zip(axes[0], bits_list, strict=True):
        series: dict[tuple, list] = {}
        for r in rows:
            k = r["key"]
            if k["bits"] == bits:
                series.setdefault((k["method"], _budget(k)), []).append(r["curve"])
        for (method, budget), curves in sorted(series.items()):
            xs, ys = mean_curve(curves)
            label = method + (f" {budget}" if len(budgets) > 1 else "") + f" (n={len(curves)})"
            style = "--" if method.endswith("pre") else "-"
            ax.plot(xs, ys, style, marker=".", label=label, color=colour[method])
        fp = [r["perplexity_fp"] for r in rows if r["key"]["bits"] == bits]
        ax.axhline(fp[0], color="gray", lw=0.8, ls=":", label="FP16")
        lo, hi = ax.get_ylim()
        if lo > 0 and hi / lo > 10:  # a diverging row (pre mode at 2 bits) would flatten the rest
            ax.set_yscale("log")
        ax.set_title(f"w{bits}")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out perplexity")
        ax.legend(fontsize=7)
    fig.suptitle("held-out perplexity during recovery (mean over seeds)")
    fig.tight_layout()
    path = json_path.with_name(json_path.stem + "_curves.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pareto(results: dict, json_path: Path) -> Path | None:
    rows = results["rows"]
    largest = _largest({_budget(r["key"]) for r in rows} - {None})
    fig, ax = plt.subplots(figsize=(6, 4.5))
    drawn = False
    for method, label in PARETO:
        points: dict[float, list[float]] = {}
        for r in rows:
            k = r["key"]
            if k["method"] == method and _budget(k) in (None, largest):
                points.setdefault(r["bits_per_weight"], []).append(r["perplexity"])
        if points:
            xs = sorted(points)
            ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o", label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(rows[0]["perplexity_fp"], color="gray", ls=":", label="FP16")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    lo, hi = ax.get_ylim()
    if hi / lo < 20:  # label the minor ticks only where there are few decades
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("bits per weight (scales, zeros and salient columns included)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("perplexity vs size" + (f" (GIFT-SW: {largest})" if largest else ""))
    ax.legend()
    fig.tight_layout()
    path = json_path.with_name(json_path.stem + "_pareto.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tools/plot_recovery.py FILE.json")
    src = Path(sys.argv[1])
    data = json.loads(src.read_text())
    for p in (plot_curves(data, src), plot_pareto(data, src)):
        print(f"wrote {p}" if p else "nothing to plot")
