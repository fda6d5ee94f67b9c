"""The paper report's PNG plots (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

from common import mean_sd

from refinery.evals.plots import _pyplot, _save


def plot_bars(groups: dict[str, dict[str, list[float]]], tasks: list[str], ylabel: str, path: Path) -> None:
    """Grouped bars (one group per task, one bar per entry), seed sd as whiskers."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.7 * len(tasks) + 2, 4))
    width = 0.8 / len(groups)
    for i, (label, vals) in enumerate(groups.items()):
        ms = [mean_sd(vals[t]) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], [m for m, _ in ms], width, yerr=[sd for _, sd in ms],
               capsize=2, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set(ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_outliers(base: list[dict], groups: dict, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, site in zip(axes, ("residual", "down_proj_in")):
        for (label, runs), color in ((("base", [base]), "#8c8c8c"), (("Muon", groups["muon"]), "#c44e52"),
                                     (("AdamW", groups["adamw"]), "#4c72b0")):
            for i, st in enumerate(runs):
                rows = [r for r in st if r["site"] == site]
                ax.plot([r["layer"] for r in rows], [r["ratio"] for r in rows], color=color, alpha=0.8,
                        label=label if i == 0 else None, marker="o", ms=3)
        ax.set(yscale="log", xlabel="decoder layer", ylabel="max |x| / median |x|", title=site)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
