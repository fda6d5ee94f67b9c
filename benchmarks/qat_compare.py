"""Float student vs PTQ (GPTQ) vs KD-QAT vs KD-QAT + ov-freeze on the quickstart task, same 4-bit grid.

    python benchmarks/qat_compare.py              # the three runs (~20-30 min on 2 shared cores), then the table
    python benchmarks/qat_compare.py --no-run     # the table of runs already made
    python benchmarks/qat_compare.py distill.steps=60 tasks.eval_limit=50   # overrides for every arm

Copies generate/ of a finished quickstart run (--from) into fresh run dirs, so every arm trains on the
same data for the same steps, then runs each stage as its own process (`refinery.launch.cli`):
- plain:  distill (LoRA, float) -> quantize (GPTQ W4 g64 sym) -> evaluate student + student_quant
          = the float student and the PTQ student;
- qat:    distill with distill.qat.enabled (W4 g64 sym) -> quantize.method=qat_rtn -> evaluate student_quant;
- qat_ov: as qat with distill.qat.freeze=[o_proj,v_proj] (ov-freeze);
- rtn:    plain's float student, quantize.method=rtn (round-to-nearest, no calibration, no QAT).
All are scored on the same held-out items; differences against the PTQ student are paired per item.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "configs/quickstart.yaml"
QAT = ["distill.qat.enabled=true", "distill.qat.bits=4", "distill.qat.group_size=64", "distill.qat.symmetric=true",
       "quantize.method=qat_rtn"]
ARMS = {"plain": ([], ["evaluate.models=[student,student_quant]"]),
        "qat": (QAT, ["evaluate.models=[student_quant]"]),
        "qat_ov": (QAT + ["distill.qat.freeze=[o_proj,v_proj]"], ["evaluate.models=[student_quant]"]),
        # the plain run's float student, round-to-nearest (GPTQModel's RTN) on the same W4 g64 grid
        "rtn": (["quantize.method=rtn"], ["evaluate.models=[student_quant]"])}
COMMON = ["quantize.bits=4", "quantize.group_size=64", "quantize.sym=true", "evaluate.latency.enabled=false"]


def stage(run_dir: Path, name: str, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "refinery.launch.cli", name, CONFIG, f"run_dir={run_dir}", *overrides]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    if subprocess.run(cmd, check=False).returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return round(time.time() - t0, 1)


def run_all(src: Path, prefix: str, extra: list[str], arms: list[str]) -> None:
    for arm in arms:
        train_over, eval_over = ARMS[arm]
        run_dir = Path(f"{prefix}-{arm}")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        shutil.copytree(src / "generate", run_dir / "generate")
        over = COMMON + train_over + extra
        stages = ("distill", "quantize", "evaluate")
        if arm == "rtn":  # same trained student as plain: reuse its distill stage (run plain first)
            shutil.copytree(Path(f"{prefix}-plain") / "distill", run_dir / "distill")
            stages = stages[1:]
        walls = {s: stage(run_dir, s, over + (eval_over if s == "evaluate" else [])) for s in stages}
        (run_dir / "bench.json").write_text(json.dumps({"overrides": over + eval_over, "wall_s": walls}, indent=1))


def samples(run_dir: Path, model: str, field: str = "acc") -> dict:
    path = run_dir / "evaluate" / "lmeval" / f"{model}_samples.jsonl"
    return {(r["task"], r["item_id"]): (r if field == "*" else r[field])
            for r in map(json.loads, path.read_text().splitlines())}


def fidelity(prefix: str, src: Path) -> list[str]:
    """Agreement with the teacher's choice and the gold answer's log-likelihood (the --from run's
    teacher predictions on the same items), paired against the PTQ student: at 135M accuracy is
    near chance for every model, these two still separate them."""
    teacher = samples(src, "teacher", "*")
    arms = {"float student": samples(Path(f"{prefix}-plain"), "student", "*"),
            "PTQ GPTQ": samples(Path(f"{prefix}-plain"), "student_quant", "*"),
            "KD-QAT": samples(Path(f"{prefix}-qat"), "student_quant", "*"),
            "KD-QAT + ov-freeze": samples(Path(f"{prefix}-qat_ov"), "student_quant", "*")}
    if (Path(f"{prefix}-rtn") / "evaluate" / "manifest.json").is_file():
        arms["PTQ RTN (no QAT)"] = samples(Path(f"{prefix}-rtn"), "student_quant", "*")
    keys = [k for k in arms["PTQ GPTQ"] if k in teacher]

    def choice(r):
        ll = r["loglikelihoods"]
        return max(range(len(ll)), key=ll.__getitem__)

    agree = {n: [float(choice(a[k]) == choice(teacher[k])) for k in keys] for n, a in arms.items()}
    gold = {n: [a[k]["loglikelihoods"][a[k]["target"]] for k in keys] for n, a in arms.items()}
    rows = [(f"| model ({len(keys)} items) | agreement with teacher | - PTQ (paired se) | gold log-lik (nats) | "
             "- PTQ (paired se) |"), "|---|---:|---:|---:|---:|"]
    for n in arms:
        da = mean_se([x - y for x, y in zip(agree[n], agree["PTQ GPTQ"])])
        dg = mean_se([x - y for x, y in zip(gold[n], gold["PTQ GPTQ"])])
        rows.append(f"| {n} | {sum(agree[n]) / len(keys):.3f} | {da[0]:+.3f} ({da[1]:.3f}) | "
                    f"{sum(gold[n]) / len(keys):.2f} | {dg[0]:+.2f} ({dg[1]:.2f}) |")
    return rows


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1) / len(xs))


def table(prefix: str) -> list[str]:
    runs = {a: Path(f"{prefix}-{a}") for a in ARMS}
    arms = {"float student (no quantization)": samples(runs["plain"], "student"),
            "PTQ: GPTQ W4 g64": samples(runs["plain"], "student_quant"),
            "KD-QAT W4 g64 (RTN export)": samples(runs["qat"], "student_quant"),
            "KD-QAT + ov-freeze W4 g64": samples(runs["qat_ov"], "student_quant")}
    if (runs["rtn"] / "evaluate" / "manifest.json").is_file():
        arms["PTQ: RTN W4 g64 (no QAT)"] = samples(runs["rtn"], "student_quant")
    ref = arms["PTQ: GPTQ W4 g64"]
    keys = sorted(ref)
    assert all(a.keys() == ref.keys() for a in arms.values()), "the arms scored different items"
    tasks = sorted({t for t, _ in keys})
    head = "| model | " + " | ".join(tasks) + " | mean acc ± se | - PTQ (paired se) |"
    rows = [head, "|---|" + "---:|" * (len(tasks) + 2)]
    for name, acc in arms.items():
        per = [sum(acc[k] for k in keys if k[0] == t) / sum(1 for k in keys if k[0] == t) for t in tasks]
        m, se = mean_se([acc[k] for k in keys])
        d, dse = mean_se([acc[k] - ref[k] for k in keys])
        rows.append(f"| {name} | " + " | ".join(f"{p:.3f}" for p in per) + f" | {m:.3f} ± {se:.3f} | "
                    + ("-" if acc is ref else f"{d:+.3f} ({dse:.3f})") + " |")
    counts = ", ".join(f"{t} {sum(1 for k in keys if k[0] == t)}" for t in tasks)
    rows += ["", f"items: {len(keys)} ({counts}); mean over all items (micro), stderr of the item mean", ""]
    rows += ["| run | distill loss first -> last | s/step | quantize KL vs its float student | wall s (distill / quantize / evaluate) |",
             "|---|---|---:|---:|---|"]
    for arm, run_dir in runs.items():
        if not (run_dir / "bench.json").is_file():
            continue
        d = json.loads((run_dir / "distill" / "manifest.json").read_text())["metrics"]
        q = json.loads((run_dir / "quantize" / "manifest.json").read_text())["metrics"]
        w = json.loads((run_dir / "bench.json").read_text())["wall_s"]
        rows.append(f"| {arm} | {d['first_loss']:.2f} -> {d['last_loss']:.2f} | {d['s_per_step']} | {q['kl_mean']:.4f} | "
                    f"{w.get('distill', 0):.0f} / {w['quantize']:.0f} / {w['evaluate']:.0f} |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every arm (e.g. distill.steps=60)")
    p.add_argument("--from", dest="src", default="runs/bench-quickstart", help="finished run whose generate/ is reused")
    p.add_argument("--prefix", default="runs/qat-compare", help="run dirs are PREFIX-plain, PREFIX-qat, PREFIX-qat_ov")
    p.add_argument("--arms", default=",".join(ARMS), help="which runs to (re)make (rtn reuses plain's distill)")
    p.add_argument("--no-run", action="store_true", help="only print the table of existing runs")
    args = p.parse_args()
    if not args.no_run:
        t0 = time.time()
        run_all(Path(args.src), args.prefix, args.overrides, args.arms.split(","))
        print(f"\nwhole benchmark: {time.time() - t0:.0f} s")
    print("\n".join(table(args.prefix) + [""] + fidelity(args.prefix, Path(args.src))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
