"""A sweep's outputs: results.csv, best.yaml, plots; and `refinery sweep status DIR`.

Everything is read from `<sweep>/results/<key>.json` (one per finished configuration, written
atomically by the trial) and the run directories, so it works on a running, crashed or
finished sweep alike.
"""
from __future__ import annotations

import csv
import fcntl
import json
import math
import statistics
from pathlib import Path

import yaml

from refinery.core.manifest import atomic_path, fmt_cell

STAGES = ("distill", "quantize", "evaluate")


def finished(sweep_dir: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in (sweep_dir / "results").glob("*.json")]
    return sorted(rows, key=lambda r: r["finished"])


def pareto(rows: list[dict]) -> set[str]:
    """Keys of configurations no other one beats on accuracy (max), bytes and decode ms (min) at once."""
    def vec(r):
        return (-r["accuracy"], r["bytes"], r["decode_ms"] if r["decode_ms"] is not None else float("inf"))

    front = set()
    for r in rows:
        v = vec(r)
        if not any(all(a <= b for a, b in zip(vec(o), v)) and vec(o) != v for o in rows):
            front.add(r["key"])
    return front


def write_outputs(sweep, sweep_dir: Path) -> None:
    rows = finished(sweep_dir)
    if not rows:
        return
    keys = list(sweep.space)
    front = pareto(rows)
    with atomic_path(sweep_dir / "results.csv") as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["order", "key", *keys, "objective", "objective_std", "accuracy", "bytes", "decode_ms",
                    "replicates", "wall_s", "pareto"])
        for i, r in enumerate(rows, 1):
            w.writerow([i, r["key"], *[r["params"].get(k) for k in keys], round(r["objective"], 6),
                        round(r["objective_std"], 6), round(r["accuracy"], 6), int(r["bytes"]),
                        r["decode_ms"], len(r["replicates"]), round(sum(x["wall_s"] for x in r["replicates"]), 1),
                        r["key"] in front])
    best = max(rows, key=lambda r: r["objective"])
    from refinery.cluster.trial import overrides
    from refinery.core.config import apply_overrides, load_yaml

    data = load_yaml(sweep.base)
    apply_overrides(data, [*overrides(sweep, best["params"]), f"run_dir={sweep_dir / 'best'}"])
    with atomic_path(sweep_dir / "best.yaml") as tmp:
        tmp.write_text(f"# best of {len(rows)} configurations in {sweep_dir} (objective {best['objective']:.4f} "
                       f"+- {best['objective_std']:.4f}); run: refinery run {sweep_dir / 'best.yaml'}\n"
                       + yaml.safe_dump(data, sort_keys=False))
    _plots(rows, front, sweep_dir / "plots")
    _report(sweep, rows, sweep_dir)


def expected_range(k: int) -> float:
    """E[max - min] of k independent standard normals (the d2 constant: 1.128 for 2, 2.534 for 6)."""
    def phi(x):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    step = 0.01
    return sum((1 - phi(x) ** k - (1 - phi(x)) ** k) * step for x in (-8 + step * (i + 0.5) for i in range(1600)))


def verdict(rows: list[dict]) -> dict | None:
    """Best vs worst configuration against the spread between seeds of one configuration.

    `spread` is the pooled standard deviation of the replicates (one seed's objective); the gap
    best - worst is compared with it and with what the same number of configurations would show
    by seed noise alone (expected range of k means, each with std spread / sqrt(replicates)):
    best and worst are picked after the fact, so their gap is never zero even when nothing differs.
    """
    if len(rows) < 2:
        return None
    best = max(rows, key=lambda r: r["objective"])
    worst = min(rows, key=lambda r: r["objective"])
    margin = best["objective"] - worst["objective"]
    multi = [r for r in rows if len(r["replicates"]) > 1]
    out = {"best": best["key"], "worst": worst["key"], "margin": margin, "configurations": len(rows),
           "spread": None, "noise_range": None}
    if not multi:
        out["text"] = (f"best {best['key']} beats worst {worst['key']} by {margin:.4f}; one replicate per "
                       "configuration, so there is no seed spread to compare it with (set replicates >= 2)")
        return out
    spread = math.sqrt(statistics.mean(r["objective_std"] ** 2 for r in multi))
    reps = statistics.mean(len(r["replicates"]) for r in multi)
    noise = expected_range(len(rows)) * spread / math.sqrt(reps)
    out.update(spread=spread, noise_range=noise)
    head = f"best {best['key']} beats worst {worst['key']} by {margin:.4f}"
    if margin <= spread:
        out["text"] = f"{head}: NOT larger than the replicate spread ({spread:.4f}, pooled std of one seed)"
    elif margin <= noise:
        out["text"] = (f"{head}: larger than the replicate spread ({spread:.4f}), but within what "
                       f"{len(rows)} configurations of equal merit would show by seed noise alone "
                       f"(expected best-worst gap {noise:.4f})")
    else:
        out["text"] = (f"{head}: larger than the replicate spread ({spread:.4f}) and than the gap seed noise "
                       f"alone would give across {len(rows)} configurations ({noise:.4f})")
    return out


def _report(sweep, rows: list[dict], sweep_dir: Path) -> None:
    """`<sweep>/REPORT.md`: configurations by objective, per-task accuracy, the best-vs-worst verdict."""
    v = verdict(rows)
    tasks = sorted({t for r in rows for x in r["replicates"] for t in x.get("per_task", {})})
    keys = list(sweep.space)
    lines = [f"# Sweep {sweep_dir}", "",
             (f"{len(rows)} of {sweep.num_samples} configurations finished, {sweep.replicates} replicate(s) each "
              f"(seeds base..base+{sweep.replicates - 1}); objective `{sweep.objective.metric}` of the quantized "
              "student, mean +- std over replicates."), "",
             "| key | " + " | ".join(keys) + " | objective | std | " + " | ".join(tasks) + " |",
             "|---|" + "---|" * len(keys) + "---:|---:|" + "---:|" * len(tasks)]
    for r in sorted(rows, key=lambda r: -r["objective"]):
        acc = [[x["per_task"][t] for x in r["replicates"] if t in x.get("per_task", {})] for t in tasks]
        lines.append(f"| {r['key']} | " + " | ".join(fmt_cell(r["params"].get(k)) for k in keys)
                     + f" | {r['objective']:.4f} | {r['objective_std']:.4f} | "
                     + " | ".join(f"{statistics.mean(a):.3f}" if a else "-" for a in acc) + " |")
    lines += ["", "**Verdict**: " + (v["text"] if v else "fewer than two configurations finished") + ".", "",
              "Plots: `plots/objective.png`, `plots/pareto.png`. Best configuration: `best.yaml`.", ""]
    with atomic_path(sweep_dir / "REPORT.md") as tmp:
        tmp.write_text("\n".join(lines))


def _plots(rows: list[dict], front: set[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.errorbar(range(1, len(rows) + 1), [r["objective"] for r in rows], yerr=[r["objective_std"] for r in rows],
                fmt="o-", capsize=3)
    ax.set(xlabel="trial (finish order)", ylabel="objective", title="objective over trials")
    fig.tight_layout()
    fig.savefig(out / "objective.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        on = r["key"] in front
        ax.scatter(r["bytes"] / 1e6, r["accuracy"], c="C3" if on else "C0", s=40 if on else 20)
    ax.set(xlabel="MB on disk (quantized student)", ylabel="accuracy", title="accuracy vs bytes (red: Pareto front)")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)


def _driver_running(sweep_dir: Path) -> bool:
    lock = sweep_dir / ".driver.lock"
    if not lock.exists():
        return False
    with lock.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def run_state(run_dir: Path) -> str:
    """done / running / stopped, with the last stage reached and distill's step."""
    from refinery.cluster.trial import LOCK

    done = [s for s in STAGES if (run_dir / s / "manifest.json").is_file()]
    metrics = run_dir / "distill" / "metrics.jsonl"
    step = sum(1 for _ in metrics.open()) if metrics.is_file() else 0
    pid = (run_dir / LOCK).read_text().strip() if (run_dir / LOCK).is_file() else ""
    live = bool(pid) and Path(f"/proc/{pid}").exists()
    state = "done" if len(done) == len(STAGES) else ("running" if live else "stopped")
    return f"{state:<8} stages done: {','.join(done) or '-':<25} distill step {step}"


def print_status(sweep_dir: Path) -> int:
    spec = sweep_dir / "sweep.json"
    if not spec.is_file():
        print(f"{sweep_dir} is not a sweep directory (no sweep.json)")
        return 2
    sweep = json.loads(spec.read_text())
    rows = finished(sweep_dir)
    print(f"sweep {sweep_dir}: driver {'running' if _driver_running(sweep_dir) else 'not running'}; "
          f"{len(rows)} of {sweep['num_samples']} configurations finished (x{sweep['replicates']} replicates)")
    for r in sorted(rows, key=lambda r: -r["objective"]):
        params = ", ".join(f"{k}={fmt_cell(v)}" for k, v in r["params"].items())
        print(f"  {r['key']}  objective {r['objective']:.4f} +- {r['objective_std']:.4f}  {params}")
    v = verdict(rows)
    if v:
        print(f"verdict: {v['text']}")
    unfinished = sweep_dir / "unfinished.json"
    done = {r["key"] for r in rows}
    for r in json.loads(unfinished.read_text()) if unfinished.is_file() else []:
        if r["key"] in done:  # recorded by an earlier driver, finished since (the sweep resumed)
            continue
        loss = f"distill loss {r['distill_loss']:.4f} at step {r['distill_step']}" if r["distill_loss"] else ""
        print(f"  {r['key']}  {r['why']}  {loss}")
    runs = sorted((sweep_dir / "runs").glob("*")) if (sweep_dir / "runs").is_dir() else []
    print("runs:")
    for d in runs:
        print(f"  {d.name:<18} {run_state(d)}")
    if (sweep_dir / "best.yaml").is_file():
        print(f"best config: {sweep_dir / 'best.yaml'}")
    return 0
