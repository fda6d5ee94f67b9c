"""Which tasks is a teacher worth distilling on? Teacher vs student, fp, paired per held-out item.

    python benchmarks/task_gap.py                       # configs/qwen.yaml: Qwen2.5-Coder 1.5B vs 0.5B
    python benchmarks/task_gap.py --config configs/quickstart.yaml --out runs/task-gap-quickstart
    python benchmarks/task_gap.py --table-only          # the table from what is already scored

Scores the config's teacher and undistilled student (`student_base`) on every bundled offline task,
all held-out items (`tasks.eval_limit=null`; the seed split is never scored), with the evaluate
stage's HF backend (lm-eval, shared contexts), one file per model and task, so a rerun resumes at
the task in progress; wall times go to `<out>/walls.jsonl`. Then per task and on the mean
over tasks: accuracy of each, the paired difference teacher - student per item with its standard
error, and whether the teacher is ahead by at least 2 paired standard errors (the tasks to keep).
The table goes to stdout and to `<out>/task_gap.md`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from refinery.core.tasks import OFFLINE

SMALL_FIRST = ["riddle_sense", "physical_intuition", "general_knowledge", "logical_deduction", "mmlu_dev",
               "strategyqa", "siqa", "winowhy"]


def paired(a: dict, b: dict, keys: list) -> tuple[float, float]:
    """Mean of acc(a) - acc(b) over `keys` and its standard error (paired per item)."""
    d = [float(a[k]["acc"]) - float(b[k]["acc"]) for k in keys]
    n = len(d)
    m = sum(d) / n
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    return m, se


def macro_paired(a: dict, b: dict, tasks: list[str]) -> tuple[float, float]:
    """The mean over tasks of the per-task paired difference, and its se (tasks independent)."""
    parts = [paired(a, b, [k for k in a if k[0] == t and k in b]) for t in tasks]
    return sum(m for m, _ in parts) / len(parts), math.sqrt(sum(se ** 2 for _, se in parts)) / len(parts)


def load(out: Path, name: str) -> dict:
    rows = [json.loads(line) for f in sorted((out / name).glob("*.jsonl")) for line in f.read_text().splitlines() if line]
    return {(r["task"], r["item_id"]): r for r in rows}


def table(out: Path, teacher: str = "teacher", student: str = "student_base") -> str:
    t, s = load(out, teacher), load(out, student)
    tasks = sorted({k[0] for k in t} & {k[0] for k in s}, key=lambda x: list(OFFLINE).index(x) if x in OFFLINE else 99)
    lines = [f"| task | items | {teacher} acc | {student} acc | {teacher} - {student} (paired se) | z | keep |",
             "|---|---:|---:|---:|---:|---:|:-:|"]
    kept = []
    for task in tasks:
        keys = [k for k in t if k[0] == task and k in s]
        m, se = paired(t, s, keys)
        acc_t = sum(float(t[k]["acc"]) for k in keys) / len(keys)
        acc_s = sum(float(s[k]["acc"]) for k in keys) / len(keys)
        z = m / se if se > 0 else float("nan")
        keep = z >= 2
        kept += [task] if keep else []
        lines.append(f"| {task} | {len(keys)} | {acc_t:.3f} | {acc_s:.3f} | {m:+.3f} ({se:.3f}) | {z:+.1f} | "
                     f"{'yes' if keep else 'no'} |")
    for label, chosen in (("mean, all tasks", tasks), ("mean, kept tasks", kept)):
        if chosen:
            m, se = macro_paired(t, s, chosen)
            lines.append(f"| **{label}** ({len(chosen)}) | | | | {m:+.3f} ({se:.3f}) | {m / se:+.1f} | |")
    lines.append("")
    lines.append(f"Kept (teacher ahead by >= 2 paired se): `tasks.names=[{', '.join(kept)}]`")
    return "\n".join(lines)


def score(cfg, model_name: str, path: str, tasks: list[str], out: Path) -> None:
    """Per-item predictions of one model, one file per task (`<out>/<model>/<task>.jsonl`, written
    atomically): a killed run loses at most the task in progress."""
    import time

    import torch

    from refinery.core.manifest import write_jsonl
    from refinery.evals.lmeval_tasks import build_tasks, task_manager
    from refinery.evals.loading import load_model
    from refinery.evals.scores import sample_rows, score_model

    todo = [t for t in tasks if not (out / model_name / f"{t}.jsonl").is_file()]
    if not todo:
        return
    if cfg.evaluate.threads:
        torch.set_num_threads(cfg.evaluate.threads)
    model, tok = load_model(path, dtype=cfg.evaluate.dtype, trust_remote_code=cfg.models.trust_remote_code)
    for task in todo:
        t0 = time.time()
        tasks_cfg = type(cfg.tasks)(names=[task], eval_fraction=cfg.tasks.eval_fraction, eval_limit=cfg.tasks.eval_limit)
        specs = build_tasks(tasks_cfg, out / "tasks")
        raw = score_model(model, tok, specs, task_manager(specs, out / "tasks"), cfg.evaluate.batch_size, cfg.seed,
                          cfg.evaluate.shared_context)
        rows = sample_rows(raw.get("samples", {}), specs)
        write_jsonl(out / model_name / f"{task}.jsonl", rows)
        with open(out / "walls.jsonl", "a") as f:
            f.write(json.dumps({"model": model_name, "task": task, "items": len(rows), "dtype": str(model.dtype),
                                "threads": torch.get_num_threads(), "wall_s": round(time.time() - t0, 1)}) + "\n")
        print(f"{model_name} {task}: {len(rows)} items, {time.time() - t0:.0f} s", flush=True)
    del model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "qwen.yaml"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "task-gap-qwen"))
    p.add_argument("--tasks", default=",".join(SMALL_FIRST), help="comma-separated offline tasks (default: all, "
                   "smallest first)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the config (e.g. tasks.eval_limit=100)")
    args = p.parse_args(argv)
    out = Path(args.out)
    tasks = args.tasks.split(",")
    if not args.table_only:
        from refinery.core.models import resolve_models
        from refinery.pipeline.config import load

        cfg = load(args.config, ["tasks.eval_limit=null", *args.overrides])
        teacher, student = resolve_models(cfg.models)
        for name, path in (("student_base", student), ("teacher", teacher)):  # the cheaper model first
            score(cfg, name, path, tasks, out)
    text = table(out)
    (out / "task_gap.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
