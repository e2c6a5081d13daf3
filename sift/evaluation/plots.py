"""The comparison's two plots (matplotlib, no display needed).

tradeoff.png: forget quality (log scale, up is better) against model utility (right is better),
one point per model, named in the legend; an approximate method is a path through its epochs (its
last epoch's number beside the end); marker area grows with the wall time it took to produce the
model.
cost.png: wall seconds and estimated FLOPs of producing each final model, log scale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

COLORS = {"exact": "#1b7837", "reference": "#2166ac", "original": "#7f7f7f", "approximate": "#b2182b"}
# one colour and one marker per approximate method (a dozen methods and variants must stay
# apart); greens and blues are left to the exact path and the references
METHOD_COLORS = [
    "#d62728",
    "#ff7f0e",
    "#8c564b",
    "#9467bd",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#7f7f7f",
    "#f781bf",
    "#a65628",
    "#984ea3",
    "#e41a1c",
    "#fdb462",
    "#b15928",
]
METHOD_MARKERS = ["o", "^", "v", "<", ">", "p", "*", "X", "h", "8", "H", "d", "P"]  # 13: coprime with 14 colours


def method_style(i: int) -> tuple[str, str]:
    """(colour, marker) of the i-th approximate method: cycles of coprime lengths (14 colours, 13
    markers), so no two of the first 182 methods share both."""
    return METHOD_COLORS[i % len(METHOD_COLORS)], METHOD_MARKERS[i % len(METHOD_MARKERS)]


def coinciding(points: list[tuple[str, float, float]]) -> list[tuple[float, float, list[str]]]:
    """Groups of names drawn at the same place (utility to 3 decimals, log10 forget quality to 2):
    the plot labels each group, so points hidden under another are still named."""
    groups: dict[tuple[float, float], list[tuple[str, float, float]]] = {}
    for name, x, y in points:
        groups.setdefault((round(x, 3), round(math.log10(y), 2)), []).append((name, x, y))
    return [(g[0][1], g[0][2], [n for n, _, _ in g]) for g in groups.values() if len(g) > 1]


def _area(seconds: float | None) -> float:
    return 30.0 + 40.0 * math.sqrt(max(0.0, seconds or 0.0))


def tradeoff_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)
    floor = 1e-12  # a p-value below this is drawn at it
    methods: dict[str, list[dict[str, Any]]] = {}
    markers = {"exact": ["D", "d"], "reference": ["s", "P"], "original": ["o", "h"]}
    shades = {"exact": ["#1b7837", "#5aae61"], "reference": ["#2166ac", "#67a9cf"], "original": ["#4d4d4d", "#999999"]}
    seen: dict[str, int] = {}
    drawn: list[tuple[str, float, float]] = []  # (name, x, y) of every point's final position
    for e in result["entries"]:
        if e["role"] == "approximate":
            methods.setdefault(e["method"], []).append(e)
            continue
        m = e["metrics"]
        if "forget_quality" not in m:
            continue
        k = seen.get(e["role"], 0)
        seen[e["role"]] = k + 1
        ax.scatter(
            [m["model_utility"]],
            [max(m["forget_quality"], floor)],
            s=_area(m.get("seconds")),
            color=shades[e["role"]][k % 2],
            marker=markers[e["role"]][(k // 2) % 2],
            alpha=0.8,
            edgecolors="black",
            linewidths=0.6,
            zorder=3,
            label=e["name"],
        )
        drawn.append((e["name"], m["model_utility"], max(m["forget_quality"], floor)))
    for i, (method, path_entries) in enumerate(sorted(methods.items())):
        color, marker = method_style(i)
        xs = [e["metrics"]["model_utility"] for e in path_entries]
        ys = [max(e["metrics"]["forget_quality"], floor) for e in path_entries]
        ax.plot(xs, ys, color=color, alpha=0.7, linewidth=1.2, zorder=2)
        ax.scatter(
            xs,
            ys,
            s=[_area(e["metrics"].get("seconds")) for e in path_entries],
            color=color,
            marker=marker,
            alpha=0.6,
            edgecolors="black",
            linewidths=0.4,
            zorder=3,
            label=f"{method} (approximate), epochs 1-{path_entries[-1]['epoch']}",
        )
        drawn.append((method, xs[-1], ys[-1]))
        ax.annotate(
            str(path_entries[-1]["epoch"]),
            (xs[-1], ys[-1]),
            textcoords="offset points",
            xytext=(5, 3),
            fontsize=7,
            color=color,
        )
    notes = []
    for k, (x, y, names) in enumerate(coinciding(drawn), 1):
        ax.annotate(f"[{k}]", (x, y), textcoords="offset points", xytext=(7, 7), fontsize=8, fontweight="bold")
        notes.append(f"[{k}] the same point: " + ", ".join(names))
    ax.set_yscale("log")
    ax.set_xlabel(
        "model utility (higher is better)\nharmonic mean of retain and general-knowledge Prob, ROUGE, truth ratio"
    )
    ax.set_ylabel("forget quality (KS p-value against the retrained reference; higher is better)")
    ax.set_title("Exact forgetting vs approximate unlearning (marker area grows with wall seconds)", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5, frameon=False)
    for handle in getattr(legend, "legend_handles", []):
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([40])
    if notes:  # below the axes, one line a group, so no name hides under another
        ax.text(0.0, -0.16, "\n".join(notes), transform=ax.transAxes, va="top", fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def cost_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals: dict[str, dict[str, Any]] = {}
    for e in result["entries"]:
        if e["role"] == "approximate":
            finals[e["method"]] = e  # the last epoch's entry wins
        elif e["role"] in ("exact", "reference") and "merged" not in e["name"]:
            finals[e["name"]] = e
    names = list(finals)
    secs = [finals[n]["metrics"].get("seconds") or 0.0 for n in names]
    flops = [finals[n]["metrics"].get("flops") or 0.0 for n in names]
    colors = [COLORS[finals[n]["role"]] for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), dpi=120)
    for ax, values, label in ((axes[0], secs, "wall seconds"), (axes[1], flops, "training FLOPs (estimate)")):
        ax.barh(names, [max(v, 1e-9) for v in values], color=colors)
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (log scale)")
        ax.invert_yaxis()
        ax.grid(True, axis="x", which="both", alpha=0.25)
        for y, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (max(v, 1e-9), y), textcoords="offset points", xytext=(3, -3), fontsize=7)
    axes[1].set_yticklabels([])
    fig.suptitle("Cost of producing each model (exact forget, approximate unlearning, full retrains)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
