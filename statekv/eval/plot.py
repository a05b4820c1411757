"""Fidelity against budget, one PNG: for each cost a user pays (bytes stored per video, bytes read per question,
prefill FLOPs when counted) two panels — KL of the first answer token against `Full` (symlog axis, so `Full`'s KL
of exactly 0 is drawn where it is) and top-1 agreement — and a third, accuracy (with its standard error), when the
items are scored; one line per method across its budgets, `Full` as the reference point, a legend, and the
summary table under the panels."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# (summary key, axis label, scale to the plotted unit); FLOPs only when counted
COSTS = (("stored_bytes", "MB stored per video", 1e-6), ("bytes_read_per_question", "MB read per question", 1e-6),
         ("prefill_flops", "prefill GFLOPs per video", 1e-9))


def method_of(name: str) -> tuple[str, float | None]:
    """The method a setting belongs to and its budget: settings whose names differ only in their first argument
    ("window:64", "window:256") are one method at two budgets; later arguments and "+int8" stay in the method's
    name ("rekv (·:64:8)"). `full` has no budget."""
    base, plus, suffix = name.partition("+")
    kind, *args = base.split(":")
    try:
        budget = float(args[0]) if args else None
    except ValueError:
        return name, None
    method = kind if len(args) <= 1 else f"{kind} (·:{':'.join(args[1:])})"
    return method + (plus + suffix if plus else ""), budget


def plot_fidelity(summary: list[dict[str, Any]], path: Path) -> Path:
    """Draw `summary` (FidelityReport.summary()) to `path`; needs matplotlib (in the `dev` extra)."""
    fig = fidelity_figure(summary)
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def fidelity_figure(summary: list[dict[str, Any]]) -> Any:
    """The matplotlib figure of `plot_fidelity` (the caller closes it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib (pip install matplotlib, or run with --no-plot)") from None
    costs = [c for c in COSTS if any(row.get(c[0]) is not None for row in summary)]
    methods: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for row in summary:
        method, budget = method_of(row["setting"])
        methods.setdefault(method, []).append((math.inf if budget is None else budget, row))
    kls = [row["first_token_kl"] for row in summary if row["first_token_kl"] > 0]
    linthresh = 10 ** math.floor(math.log10(min(kls))) if kls else 1e-6

    metrics = ["first_token_kl", "top1_agreement"] + (
        ["accuracy"] if any(row.get("accuracy") is not None for row in summary) else [])
    heights = [3.6] * len(metrics) + [0.6 + 0.3 * len(summary)]  # inches: a panel row each, then the table
    fig = plt.figure(figsize=(4.6 * len(costs) + 1.5, sum(heights)), layout="constrained")
    grid = fig.add_gridspec(len(metrics) + 1, len(costs), height_ratios=heights)
    colors = plt.get_cmap("tab10")
    for col, (key, label, scale) in enumerate(costs):
        axes = {metric: fig.add_subplot(grid[row, col]) for row, metric in enumerate(metrics)}
        kl_ax, top1_ax = axes["first_token_kl"], axes["top1_agreement"]
        for m, (method, points) in enumerate(methods.items()):
            points = sorted((p for p in points if p[1].get(key) is not None), key=lambda p: p[0])
            if not points:
                continue
            xs = [p[1][key] * scale for p in points]
            reference = method == "full"
            style = dict(color="black", marker="*", markersize=13, linestyle="none", zorder=2) if reference else \
                dict(color=colors(m % 10), marker="o", markersize=5, linewidth=1.6, zorder=3)
            for metric, ax in axes.items():
                ax.plot(xs, [p[1][metric] for p in points], label="full (reference)" if reference else method,
                        **style)
                if metric == "accuracy":
                    ax.errorbar(xs, [p[1][metric] for p in points], yerr=[p[1]["accuracy_se"] for p in points],
                                fmt="none", ecolor=style["color"], alpha=0.5, capsize=2)
                if not reference and len(points) > 1:  # the budget of each point, small, beside it
                    for x, (budget, row) in zip(xs, points):
                        ax.annotate(f"{budget:g}", (x, row[metric]), textcoords="offset points", xytext=(4, 4),
                                    fontsize=7, color=style["color"])
        values = [row[key] * scale for row in summary if row.get(key) is not None]
        for ax in axes.values():
            if values and min(values) > 0 and max(values) / min(values) > 20:
                ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
        kl_ax.set_yscale("symlog", linthresh=linthresh)
        kl_ax.set_ylim(bottom=0)
        kl_ax.set(title=f"fidelity vs {label}", ylabel="KL(Full ‖ setting), first token" if col == 0 else None)
        top1_ax.set(xlabel=label, ylim=(-0.05, 1.05), ylabel="top-1 agreement with Full" if col == 0 else None)
        if "accuracy" in axes:
            axes["accuracy"].set(xlabel=label, ylim=(-0.05, 1.05), ylabel="accuracy (± s.e.)" if col == 0 else None)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", title="method (point labels: budget)", fontsize=8)

    table_ax = fig.add_subplot(grid[len(metrics), :])
    table_ax.axis("off")
    header, cells = _table(summary, costs)
    table = table_ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="left", colLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(len(header))))
    return fig


def _table(summary: list[dict[str, Any]], costs: tuple[tuple[str, str, float], ...] | list) -> tuple[list[str], list[list[str]]]:
    """The summary rows as text: fidelity first, then each cost plotted, then latency."""
    scored = any(row.get("accuracy") is not None for row in summary)
    header = ["setting", "KL", "top-1", "greedy", *(["accuracy"] if scored else []), *[c[1] for c in costs],
              "first token s"]
    cells = []
    for row in summary:
        cells.append([row["setting"], f"{row['first_token_kl']:.3g}", f"{row['top1_agreement']:.2f}",
                      f"{row['greedy_agreement']:.2f}",
                      *([_text(row.get("accuracy"), ".2f")] if scored else []),
                      *[_text(None if row.get(key) is None else row[key] * scale, ".4g") for key, _, scale in costs],
                      f"{row['first_token_s_p50']:.3f}"])
    return header, cells


def _text(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)
