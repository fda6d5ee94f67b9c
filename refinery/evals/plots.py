"""The report's PNG plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

from refinery.core.manifest import atomic_path

COLORS = {"teacher": "#4c72b0", "student_base": "#8c8c8c", "student": "#55a868", "student_quant": "#c44e52"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: never try to open a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _pyplot().close(fig)


def plot_accuracy(results: dict, names: list[str], path: str | Path) -> None:
    """Grouped bars: accuracy per task (groups) per model (bars), with stderr whiskers."""
    plt = _pyplot()
    tasks = results["tasks"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(tasks) + 2), 4.2))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        scores = results["models"][name]["tasks"]
        xs = [t + (i - (len(names) - 1) / 2) * width for t in range(len(tasks))]
        accs = [scores[t]["acc"] for t in tasks]
        errs = [scores[t]["acc_stderr"] or 0.0 for t in tasks]
        ax.bar(xs, accs, width, yerr=errs, capsize=2, label=name, color=COLORS.get(name))
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylabel("accuracy (held-out items)")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy per task (bars: ±1 stderr)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never hides a bar
    ax.grid(axis="y", alpha=0.3)
    _save(fig, Path(path))


def plot_size_vs_accuracy(results: dict, names: list[str], path: str | Path) -> None:
    """One point per model: weights on disk (MB) against mean accuracy, with stderr whiskers."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    labels: dict[tuple, list[str]] = {}
    for name in names:
        m = results["models"][name]
        if not m.get("bytes"):
            continue
        mb = m["bytes"] / 1e6
        ax.errorbar(mb, m["mean_acc"], yerr=m.get("mean_acc_stderr") or 0.0, fmt="o", capsize=3,
                    color=COLORS.get(name), label=name)
        labels.setdefault((round(mb, 1), round(m["mean_acc"], 4)), []).append(name)
    for (mb, acc), group in labels.items():  # models at the same point share one label
        ax.annotate(" / ".join(group), (mb, acc), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel("mean accuracy over tasks")
    ax.set_title("Size vs accuracy")
    ax.grid(alpha=0.3)
    _save(fig, Path(path))


def plot_loss(rows: list[dict], path: str | Path) -> None:
    """The distill loss per step (and its 10-step moving average when there are enough steps)."""
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(steps, loss, lw=1, alpha=0.5 if len(rows) >= 20 else 1.0, label="loss")
    if len(rows) >= 20:
        k = 10
        avg = [sum(loss[i - k + 1:i + 1]) / k for i in range(k - 1, len(loss))]
        ax.plot(steps[k - 1:], avg, lw=2, label=f"{k}-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("distill loss")
    ax.set_title("Distillation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, Path(path))
