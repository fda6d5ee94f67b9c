"""The `report` stage: one markdown page and PNG plots from the run's artifacts.

    refinery report configs/quickstart.yaml

Reads `<run_dir>/evaluate/results.json`, the stages' manifest.json files (wall time, metrics,
resolved config), `<run_dir>/generate/data.jsonl` and `<run_dir>/distill/metrics.jsonl` when
present. Writes `<run_dir>/report/REPORT.md`, `accuracy.png`, `size_vs_accuracy.png` and
`distill_loss.png` (when the distill metrics exist), and prints the accuracy table.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

from refinery.core.manifest import atomic_path, read_jsonl, read_manifest
from refinery.core.stage import Context, Result
from refinery.evals.config import MODELS, ReportConfig
from refinery.evals.fidelity import fidelity, fidelity_line, fidelity_table

log = logging.getLogger("refinery.report")
STAGES = ("generate", "distill", "quantize", "evaluate")


def _fmt(x, nd: int = 3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _acc(cell: dict | None) -> str:
    if not cell or cell.get("acc") is None:
        return "–"
    se = cell.get("acc_stderr")
    return f"{cell['acc']:.3f} ± {se:.3f}" if se is not None else f"{cell['acc']:.3f}"


def ordered_models(results: dict) -> list[str]:
    """The models in results, in pipeline order (teacher, student_base, student, student_quant)."""
    known = [m for m in MODELS if m in results["models"]]
    return known + sorted(m for m in results["models"] if m not in known)


def accuracy_table(results: dict) -> str:
    """Markdown: one row per task (acc ± stderr per model), then the mean row."""
    names = ordered_models(results)
    lines = ["| task | n | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for task in results["tasks"]:
        cells = [results["models"][m]["tasks"].get(task) for m in names]
        n = next((c.get("n") for c in cells if c), None)
        lines.append(f"| {task} | {n if n is not None else '–'} | " + " | ".join(_acc(c) for c in cells) + " |")
    means = [_acc({"acc": results["models"][m]["mean_acc"], "acc_stderr": results["models"][m].get("mean_acc_stderr")})
             for m in names]
    lines.append("| **mean** | | " + " | ".join(f"**{v}**" for v in means) + " |")
    return "\n".join(lines)


def size_table(results: dict) -> str:
    """Markdown: params, MB on disk and compression vs the teacher and vs the fp student."""
    names = ordered_models(results)
    models = results["models"]

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "–"

    ref = (models.get("teacher") or {}).get("bytes")
    fp_student = (models.get("student") or models.get("student_base") or {}).get("bytes")
    lines = ["| model | params (M) | on disk (MB) | teacher / model | fp student / model | mean acc |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in names:
        e = models[m]
        b = e.get("bytes")
        params = f"{e['params'] / 1e6:.1f}" if e.get("params") else "–"
        lines.append(f"| {m} | {params} | {_fmt(b / 1e6 if b else None, 1)} | {ratio(ref, b)} | "
                     f"{ratio(fp_student, b) if m.startswith('student') else '–'} | {_fmt(e['mean_acc'])} |")
    return "\n".join(lines)


def latency_table(results: dict) -> str:
    """Markdown: batch-1 decode ms/token, prefill tokens/s and in-memory weight bytes per model."""
    lines = ["| model | decode ms/token | prefill tokens/s | weights in memory (MB) | dtype | threads |",
             "|---|---:|---:|---:|---|---:|"]
    rows = 0
    for m in ordered_models(results):
        lat = results["models"][m].get("latency")
        if not lat:
            continue
        rows += 1
        lines.append(f"| {m} | {_fmt(lat['decode_ms_per_token'], 1)} | {_fmt(lat['prefill_tokens_per_s'], 1)} | "
                     f"{_fmt(lat['memory_bytes'] / 1e6, 1)} | {lat.get('dtype', '–')} | {lat.get('threads', '–')} |")
    return "\n".join(lines) if rows else "_latency not measured (evaluate.latency.enabled: false)_"


def _paired_delta(run_dir: Path, a: str, b: str, tasks: list[str]) -> tuple[float, float] | None:
    """(mean over tasks of acc[a] - acc[b], its stderr) from per-item predictions on the same items."""
    paths = [run_dir / "evaluate" / "lmeval" / f"{m}_samples.jsonl" for m in (a, b)]
    if not all(p.is_file() for p in paths):
        return None
    per = [{(r["task"], r["item_id"]): r["acc"] for r in read_jsonl(p)} for p in paths]
    deltas, variances = [], []
    for task in tasks:
        keys = [k for k in per[0] if k[0] == task and k in per[1]]
        if len(keys) < 2:
            return None
        d = [per[0][k] - per[1][k] for k in keys]
        mean = sum(d) / len(d)
        deltas.append(mean)
        variances.append(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    return sum(deltas) / len(tasks), math.sqrt(sum(variances)) / len(tasks)


def compare(results: dict, a: str, b: str, run_dir: Path | None = None) -> dict | None:
    """Mean-accuracy difference a - b with its stderr: paired over items when per-item predictions
    exist (same held-out items for both models), else from the two means' stderrs as independent."""
    models = results["models"]
    if a not in models or b not in models:
        return None
    paired = _paired_delta(run_dir, a, b, results["tasks"]) if run_dir else None
    if paired:
        delta, se = paired
    else:
        delta = models[a]["mean_acc"] - models[b]["mean_acc"]
        se = math.hypot(models[a].get("mean_acc_stderr") or 0.0, models[b].get("mean_acc_stderr") or 0.0)
    return {"a": a, "b": b, "acc_a": models[a]["mean_acc"], "acc_b": models[b]["mean_acc"],
            "delta": delta, "stderr": se, "paired": bool(paired), "z": delta / se if se > 0 else None}


def verdict(results: dict, run_dir: Path | None = None) -> tuple[str, dict | None]:
    """One honest line: did the distilled student beat the undistilled one on held-out items?"""
    c = compare(results, "student", "student_base", run_dir)
    if c is None:
        return "No verdict: the results lack `student` or `student_base`.", None
    head = (f"distilled student {c['acc_a']:.3f} vs undistilled {c['acc_b']:.3f} mean accuracy on held-out "
            f"items: Δ = {c['delta']:+.3f}, stderr {c['stderr']:.3f}"
            f"{' (paired over the same items)' if c['paired'] else ''}")
    z = c["z"]
    if z is None:
        call = "identical scores" if c["delta"] == 0 else "no stderr to judge by"
    elif z >= 2:
        call = f"the distilled student BEAT the undistilled student ({z:.1f} stderr)"
    elif z <= -2:
        call = f"the distilled student did WORSE than the undistilled student ({-z:.1f} stderr)"
    else:
        side = "higher" if c["delta"] > 0 else "lower" if c["delta"] < 0 else "equal"
        call = f"no clear difference: {side} by {abs(z):.1f} stderr, within noise (< 2 stderr)"
    return f"Verdict: {call}; {head}.", c


def _teacher_note(results: dict, run_dir: Path | None) -> str | None:
    """Say so when the teacher has no accuracy edge to pass on (accuracy then can't show distillation)."""
    c = compare(results, "teacher", "student_base", run_dir)
    if c is None or (c["z"] is not None and c["z"] >= 2):
        return None
    return (f"Note: the teacher's own mean accuracy ({c['acc_a']:.3f}) is not clearly above the undistilled "
            f"student's ({c['acc_b']:.3f}, Δ {c['delta']:+.3f}, stderr {c['stderr']:.3f}): on these tasks the "
            "teacher has little accuracy to pass on, so fidelity to the teacher is the measure of what "
            "distillation transferred.")


def _quant_line(results: dict, run_dir: Path | None) -> str | None:
    c = compare(results, "student_quant", "student", run_dir)
    if c is None:
        return None
    models = results["models"]
    size = ""
    if models["student"].get("bytes") and models["student_quant"].get("bytes"):
        size = (f"; size {models['student']['bytes'] / 1e6:.1f} MB -> {models['student_quant']['bytes'] / 1e6:.1f} MB "
                f"({models['student']['bytes'] / models['student_quant']['bytes']:.2f}x smaller)")
    return (f"4-bit cost: student_quant {c['acc_a']:.3f} vs student {c['acc_b']:.3f} "
            f"(Δ = {c['delta']:+.3f}, stderr {c['stderr']:.3f}){size}.")


def stage_summary(run_dir: Path) -> list[dict]:
    """Per stage: status, wall seconds and metrics from its manifest.json (absent stages omitted)."""
    rows = []
    for stage in STAGES:
        m = read_manifest(run_dir / stage)
        if m:
            rows.append({"stage": stage, "status": m.get("status"), "wall_s": m.get("wall_s"),
                         "metrics": m.get("metrics") or {}, "config": m.get("config") or {}})
    return rows


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_lines(ctx: Context, stages: list[dict]) -> list[str]:
    """Run-wide settings, then each finished stage's own config section, flattened."""
    student = ctx.models.student.path or f"teacher cut to {ctx.models.student.keep_layers} layers"
    lines = [f"- run dir: `{ctx.run_dir}`, seed {ctx.seed}",
             f"- teacher: `{ctx.models.teacher}`; student: `{student}`",
             f"- tasks: {', '.join(ctx.tasks.names)} (held-out fraction {ctx.tasks.eval_fraction}, "
             f"at most {ctx.tasks.eval_limit} items per task)"]
    for s in stages:
        section = s["config"].get(s["stage"])
        if isinstance(section, dict) and section:
            items = ", ".join(f"{k}={v}" for k, v in _flat(section).items())
            lines.append(f"- {s['stage']}: {items}")
    return lines


def generate_lines(run_dir: Path) -> list[str]:
    """Counts of the generated training data: rows per task and mean teacher score."""
    path = run_dir / "generate" / "data.jsonl"
    if not path.is_file():
        return []
    rows = read_jsonl(path)
    per_task = Counter(r.get("task", "?") for r in rows)
    scores = [r["score"] for r in rows if isinstance(r.get("score"), (int, float))]
    mean = f", mean teacher score {sum(scores) / len(scores):.2f}" if scores else ""
    return [f"- generated pairs kept: {len(rows)} ({', '.join(f'{t}: {n}' for t, n in sorted(per_task.items()))}){mean}"]


def distill_lines(rows: list[dict]) -> list[str]:
    """First, last and minimum distill loss from metrics.jsonl rows."""
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
    if not losses:
        return []
    return [f"- distill loss: first {losses[0]:.4f} (step {rows[0].get('step')}), last {losses[-1]:.4f} "
            f"(step {rows[-1].get('step')}), min {min(losses):.4f} over {len(losses)} steps"]


def render(title: str, ctx: Context, results: dict, stages: list[dict], loss_rows: list[dict],
           plots: list[str]) -> str:
    """The whole REPORT.md text."""
    verdict_line, _ = verdict(results, ctx.run_dir)
    quant = _quant_line(results, ctx.run_dir)
    out = [f"# {title}", "", f"**{verdict_line}**", ""]
    fid_line = fidelity_line(ctx.run_dir)
    if fid_line:
        out += [f"**{fid_line}**", ""]
    teacher_note = _teacher_note(results, ctx.run_dir)
    if teacher_note:
        out += [teacher_note, ""]
    if quant:
        out += [quant, ""]
    out += ["## Config", "", *config_lines(ctx, stages), ""]
    out += ["## Stages", "", "| stage | status | wall time (s) |", "|---|---|---:|"]
    out += [f"| {s['stage']} | {s['status']} | {_fmt(s['wall_s'], 1)} |" for s in stages]
    if not stages:
        out += ["| _no stage manifest.json found_ | | |"]
    out += ["", *generate_lines(ctx.run_dir), *distill_lines(loss_rows), ""]
    out += ["## Accuracy (held-out items, zero-shot, acc ± stderr)", "", accuracy_table(results), ""]
    generative = sorted({t for e in results["models"].values() for t, v in e["tasks"].items()
                         if v.get("metric") == "exact_match"})
    if generative:
        out += [f"Generative tasks ({', '.join(generative)}): acc is exact match of the greedy answer with a "
                "reference answer (case, punctuation and spacing ignored); agreement below compares "
                "answers the same way.", ""]
    fid = fidelity(ctx.run_dir, ordered_models(results))
    out += ["## Distillation fidelity (same held-out items)", "", fidelity_table(fid), "",
            "Agreement: share of items where the model's most likely answer is the teacher's. "
            "Gold-answer log-likelihood: mean over items of the correct answer's log-probability.", ""]
    out += ["## Size", "", size_table(results), ""]
    out += ["## Latency (batch size 1, this machine)", "", latency_table(results), "",
            "CPU latency compares models on this machine only; the method's ~50% per-token gain for "
            "4-bit models is a GPU result under vLLM (4-bit CPU kernels can be slower than fp32).", ""]
    out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


def load_results(run_dir: Path) -> dict:
    """evaluate/results.json, or a clear error saying to run the evaluate stage."""
    path = run_dir / "evaluate" / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"report: {path} not found: run the evaluate stage first "
                                "(`refinery evaluate CONFIG`)")
    results = json.loads(path.read_text())
    if not results.get("models") or "tasks" not in results:
        raise ValueError(f"report: {path} has no models or tasks: re-run the evaluate stage (--force)")
    return results


def run(ctx: Context, cfg: ReportConfig) -> Result:
    """Write REPORT.md and the PNG plots; print the accuracy table."""
    from refinery.evals import plots

    out = ctx.stage_dir("report")
    results = load_results(ctx.run_dir)
    stages = stage_summary(ctx.run_dir)
    metrics_path = ctx.run_dir / "distill" / "metrics.jsonl"
    loss_rows = read_jsonl(metrics_path) if metrics_path.is_file() else []
    names = ordered_models(results)
    made = ["accuracy.png", "size_vs_accuracy.png"]
    plots.plot_accuracy(results, names, out / "accuracy.png")
    plots.plot_size_vs_accuracy(results, names, out / "size_vs_accuracy.png")
    if [r for r in loss_rows if isinstance(r.get("loss"), (int, float))]:
        plots.plot_loss(loss_rows, out / "distill_loss.png")
        made.append("distill_loss.png")
    text = render(cfg.title, ctx, results, stages, loss_rows, made)
    with atomic_path(out / "REPORT.md") as tmp:
        tmp.write_text(text)
    verdict_line, c = verdict(results, ctx.run_dir)
    print(f"\n{accuracy_table(results)}\n\n{verdict_line}\nreport: {out / 'REPORT.md'}")
    log.info("report: wrote %s", out / "REPORT.md")
    metrics = {"verdict": verdict_line, "fidelity": fidelity_line(ctx.run_dir)}
    if c:
        metrics.update({"student_minus_base": round(c["delta"], 4), "stderr": round(c["stderr"], 4)})
    return Result(metrics=metrics, outputs=["REPORT.md", *made])
