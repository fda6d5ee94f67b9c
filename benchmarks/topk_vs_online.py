"""Distillation from cached top-k teacher logits vs online distillation, on the quickstart task.

    python benchmarks/topk_vs_online.py            # ~15 min on 2 cores: both runs, then the tables
    python benchmarks/topk_vs_online.py --no-run   # the tables of runs already made
    python benchmarks/topk_vs_online.py --k 1024 --reuse-online   # another k against the same online run

Copies generate/ of a finished quickstart run (--from) into two fresh run dirs, then runs each
stage as its own process, so each peak RSS (from os.wait4) belongs to that stage alone:
- online: `refinery distill configs/quickstart.yaml` as configured (live teacher, hidden-state cache);
- topk:   `refinery teacher-logits` then `refinery distill` with distill.teacher_source=topk
          (the teacher is not loaded during distill).
Both students are then merged (`refinery quantize`) and scored by `refinery evaluate` with
evaluate.models=[student] on the same held-out items. Accuracy differences are paired per item;
agreement with the teacher and gold-answer log-likelihood use the --from run's teacher and
undistilled student predictions on those same items.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "configs/quickstart.yaml"
# bf16 teacher in the cache, as the online teacher runs (distill.dtype: bfloat16): only the top-k
# approximation differs between the two runs, not the teacher's precision.
TOPK = ["distill.teacher_source=topk", "teacher_logits.dtype=bfloat16"]
EVAL = ["evaluate.models=[student]", "evaluate.latency.enabled=false"]


def measured(cmd: list[str]) -> dict:
    """Run `cmd`; its wall time and peak RSS (ru_maxrss of that child and its children)."""
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return {"wall_s": round(time.time() - t0, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}


def stage(run_dir: Path, name: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "refinery.launch.cli", name, CONFIG, f"run_dir={run_dir}", *overrides]
    res = measured(cmd)
    res["stage_wall_s"] = json.loads((run_dir / name / "manifest.json").read_text())["wall_s"]
    return res


def run_all(src: Path, prefix: str, topk_dir: str, k: int, reuse_online: bool) -> None:
    arms = [("online", Path(f"{prefix}-online"), [])] if not reuse_online else []
    for kind, run_dir, over in arms + [("topk", Path(topk_dir), TOPK + [f"teacher_logits.k={k}"])]:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        shutil.copytree(src / "generate", run_dir / "generate")
        res = {}
        if kind == "topk":
            res["teacher-logits"] = stage(run_dir, "teacher-logits", over)
        res["distill"] = stage(run_dir, "distill", over)
        stage(run_dir, "quantize", over)  # only for quantize/merged/, the fp student evaluate reads
        stage(run_dir, "evaluate", over + EVAL)
        (run_dir / "bench.json").write_text(json.dumps(res, indent=1))


def samples(run_dir: Path, model: str) -> dict:
    path = run_dir / "evaluate" / "lmeval" / f"{model}_samples.jsonl"
    return {(r["task"], r["item_id"]): r for r in map(json.loads, path.read_text().splitlines())}


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def memory_table(online: Path, topk: Path) -> list[str]:
    on = json.loads((online / "bench.json").read_text())
    tk = json.loads((topk / "bench.json").read_text())
    rows = ["| path | process | peak RSS GB | process wall s | stage wall s |", "|---|---|---:|---:|---:|"]
    for label, part, r in (("online", "distill (live teacher + cache)", on["distill"]),
                           ("topk", "teacher-logits (teacher alone)", tk["teacher-logits"]),
                           ("topk", "distill (no teacher)", tk["distill"])):
        rows.append(f"| {label} | {part} | {r['peak_rss_gb']:.2f} | {r['wall_s']:.0f} | {r['stage_wall_s']:.0f} |")
    d_on, d_tk = on["distill"], tk["distill"]
    rows += ["", (f"- distill peak RSS topk / online: **{d_tk['peak_rss_gb'] / d_on['peak_rss_gb']:.2f}x** "
                  f"({d_on['peak_rss_gb'] - d_tk['peak_rss_gb']:.2f} GB less)"),
             ("- topk path wall (teacher-logits + distill processes) / online distill process: "
              f"{(tk['teacher-logits']['wall_s'] + d_tk['wall_s']) / d_on['wall_s']:.2f}x")]
    return rows


def accuracy_table(online: Path, topk: Path) -> list[str]:
    a, b = samples(online, "student"), samples(topk, "student")
    assert a.keys() == b.keys(), "the two runs scored different items"
    tasks = sorted({t for t, _ in a})
    rows = ["| task | items | online acc | topk acc | topk - online | paired stderr |", "|---|---:|---:|---:|---:|---:|"]
    per_task = []
    for task in tasks:
        keys = [k for k in a if k[0] == task]
        acc_a = sum(a[k]["acc"] for k in keys) / len(keys)
        acc_b = sum(b[k]["acc"] for k in keys) / len(keys)
        d, se = mean_se([b[k]["acc"] - a[k]["acc"] for k in keys])
        per_task.append((acc_a, acc_b, d, se))
        rows.append(f"| {task} | {len(keys)} | {acc_a:.3f} | {acc_b:.3f} | {d:+.3f} | {se:.3f} |")
    n = len(per_task)
    mean = [sum(t[i] for t in per_task) / n for i in range(3)]
    se = math.sqrt(sum(t[3] ** 2 for t in per_task)) / n  # macro mean of independent per-task means
    rows.append(f"| **mean (macro)** | {len(a)} | {mean[0]:.3f} | {mean[1]:.3f} | **{mean[2]:+.3f}** | {se:.3f} |")
    return rows


def fidelity_table(online: Path, topk: Path, ref: Path) -> list[str]:
    """Agreement with the teacher's choice and gold-answer log-likelihood, paired against online."""
    teacher = samples(ref, "teacher")
    models = {"student_base (undistilled)": samples(ref, "student_base"),
              "online": samples(online, "student"), "topk": samples(topk, "student")}
    keys = [k for k in models["online"] if k in teacher and all(k in m for m in models.values())]

    def choice(r):
        ll = r["loglikelihoods"]
        return max(range(len(ll)), key=ll.__getitem__)

    agree = {name: [float(choice(m[k]) == choice(teacher[k])) for k in keys] for name, m in models.items()}
    gold = {name: [m[k]["loglikelihoods"][m[k]["target"]] for k in keys] for name, m in models.items()}
    rows = [(f"| model ({len(keys)} items) | agreement with teacher | - online (paired se) | "
             "gold log-lik (nats) | - online (paired se) |"), "|---|---:|---:|---:|---:|"]
    for name in models:
        da = mean_se([x - y for x, y in zip(agree[name], agree["online"])])
        dg = mean_se([x - y for x, y in zip(gold[name], gold["online"])])
        rows.append(f"| {name} | {sum(agree[name]) / len(keys):.3f} | {da[0]:+.3f} ({da[1]:.3f}) | "
                    f"{sum(gold[name]) / len(keys):.2f} | {dg[0]:+.2f} ({dg[1]:.2f}) |")
    return rows


def loss_line(online: Path, topk: Path) -> str:
    parts = []
    for kind, run_dir in (("online", online), ("topk", topk)):
        m = json.loads((run_dir / "distill" / "manifest.json").read_text())["metrics"]
        parts.append(f"{kind}: {m['steps']} steps, {m['s_per_step']} s/step, loss {m['first_loss']:.2f} -> {m['last_loss']:.2f}")
    return "- distill: " + "; ".join(parts) + " (the top-k bucket loss is a different number, not comparable)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", default="runs/bench-quickstart",
                   help="finished quickstart run: its generate/ is reused, its teacher predictions are the reference")
    p.add_argument("--prefix", default="runs/topk-vs-online", help="run dirs are PREFIX-online and PREFIX-topk")
    p.add_argument("--k", type=int, default=64, help="teacher_logits.k (run dir PREFIX-topk, or PREFIX-topkK if not 64)")
    p.add_argument("--reuse-online", action="store_true", help="keep the finished PREFIX-online run")
    p.add_argument("--no-run", action="store_true", help="only print the tables of existing runs")
    args = p.parse_args()
    src, online = Path(args.src), Path(f"{args.prefix}-online")
    topk = Path(f"{args.prefix}-topk" + ("" if args.k == 64 else str(args.k)))
    if not args.no_run:
        t0 = time.time()
        run_all(src, args.prefix, str(topk), args.k, args.reuse_online)
        print(f"\nwhole benchmark: {time.time() - t0:.0f} s")
    print(f"\nmachine: {os.cpu_count()} cores; top-k k={args.k}\n")
    print("\n".join(memory_table(online, topk) + [loss_line(online, topk), ""] + accuracy_table(online, topk) + [""]
                    + fidelity_table(online, topk, src)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
