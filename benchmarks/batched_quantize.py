"""Batched quantize (one job, N checkpoints) against N separate single-checkpoint jobs.

    python benchmarks/batched_quantize.py                 # 4 quickstart students, ~15 min on 2 idle cores
    python benchmarks/batched_quantize.py --workers 1 2   # batched with 1 actor, then with 2 (1 core each on CPU)
    python benchmarks/batched_quantize.py --command batch # quantize + evaluate (vLLM workers): `refinery batch`
    python benchmarks/batched_quantize.py --command batch --variants default no-overlap   # one batched job each

The checkpoints are the distill adapters of finished quickstart-config runs (12-layer SmolLM2 cut):
their `distill/` dirs are copied into `<work>/ckpts/<run>/` (the runs are only read). Both sides run
the same command with the same options and calibration data (`--data`, the bench-quickstart
run's generate/data.jsonl), each as its own process:

    batched:  refinery quantize CONFIG --checkpoints C1 C2 C3 C4 --out <work>/batched
    separate: refinery quantize CONFIG --checkpoints Ci --out <work>/separate/i   (i = 0..3, in turn)

Wall time is the process's, start to exit (imports, Ray, model loads included). The load average
is read before and after each side: the machine may be shared.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ["bench-quickstart", "q-fsdp2", "topk-vs-online-online", "topk-vs-online-topk"]


def timed(cmd: list[str], log: Path) -> float:
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)  # each job starts its own private Ray, as a user's would
    t0 = time.time()
    with log.open("w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if code:
        raise SystemExit(f"failed ({code}), see {log}: {' '.join(cmd)}")
    return round(time.time() - t0, 1)


def load_avg() -> float:
    return os.getloadavg()[0]


def rows(out: Path) -> list[dict]:
    path = out / "quantize.csv" if (out / "quantize.csv").is_file() else out / "quantize" / "quantize.csv"
    with path.open() as f:
        return list(csv.DictReader(f))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--runs", nargs="+", default=RUNS, help="run dirs under runs/ whose distill adapters to use")
    ap.add_argument("--data", default="runs/bench-quickstart/generate/data.jsonl")
    ap.add_argument("--work", default="runs/bench-batched-quantize", help="scratch dir (recreated)")
    ap.add_argument("--workers", type=int, nargs="+", default=[None],
                    help="actors of the batched job, one batched job per value (default: its own default)")
    ap.add_argument("--variants", nargs="+", default=["default"],
                    help="one batched job per value: 'default' (no extra flag) or a flag without its dashes, "
                         "e.g. no-overlap")
    ap.add_argument("--order", choices=["batched-first", "separate-first"], default="batched-first")
    ap.add_argument("--command", choices=["quantize", "batch"], default="quantize",
                    help="quantize: `refinery quantize --checkpoints`; batch: `refinery batch` (quantize + evaluate)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for both sides, e.g. quantize.bits=3")
    args = ap.parse_args()

    work = ROOT / args.work
    shutil.rmtree(work, ignore_errors=True)
    ckpts = []
    for run in args.runs:
        dst = work / "ckpts" / run
        shutil.copytree(ROOT / "runs" / run / "distill", dst / "distill",
                        ignore=shutil.ignore_patterns("checkpoints"))
        ckpts.append(str(dst))
    base = [sys.executable, "-m", "refinery.launch.cli", args.command, args.config, "--data", args.data,
            *args.overrides]
    result = {"command": args.command, "runs": args.runs, "overrides": args.overrides, "cpus": os.cpu_count(),
              "batched": {}}

    def batched():
        for w in args.workers:
            for flags in args.variants:
                extra = [] if flags == "default" else [f"--{flags.lstrip('-')}"]
                key = "-".join(filter(None, [f"workers={w}" if w else "", flags])) or "default"
                cmd = [*base, "--checkpoints", *ckpts, "--out", str(work / f"batched-{key}"), *extra]
                la = load_avg()
                wall = timed(cmd + (["--workers", str(w)] if w else []), work / f"batched-{key}.log")
                result["batched"][key] = {"wall_s": wall, "load_before": la, "load_after": load_avg(),
                                          "rows": rows(work / f"batched-{key}")}

    def separate():
        la, walls = load_avg(), []
        for i, c in enumerate(ckpts):
            walls.append(timed([*base, "--checkpoints", c, "--out", str(work / "separate" / str(i))],
                               work / f"separate-{i}.log"))
        result["separate"] = {"wall_s": round(sum(walls), 1), "per_run_s": walls, "load_before": la,
                              "load_after": load_avg()}

    for side in ((batched, separate) if args.order == "batched-first" else (separate, batched)):
        side()
    result["separate_rows"] = [r for i in range(len(ckpts)) for r in rows(work / "separate" / str(i))]
    sep = result["separate"]
    for r in result["batched"].values():
        r["ratio"] = round(r["wall_s"] / sep["wall_s"], 3)
    (work / "bench.json").write_text(json.dumps(result, indent=2) + "\n")

    n = len(ckpts)
    print("\n| path | checkpoints | wall s | s per checkpoint | ratio to separate | load avg before -> after |")
    print("|---|---:|---:|---:|---:|---|")
    sides = [(f"batched, one job ({k})", r) for k, r in result["batched"].items()]
    for name, r in sides + [(f"{n} separate jobs", {**sep, "ratio": 1.0})]:
        print(f"| {name} | {n} | {r['wall_s']:.1f} | {r['wall_s'] / n:.1f} | {r['ratio']:.2f} | "
              f"{r['load_before']:.1f} -> {r['load_after']:.1f} |")
    print(f"\nseparate runs, wall s each: {sep['per_run_s']}")
    print("\n| checkpoint | path | time s in job | KL | ppl float -> quant | MB before -> after |")
    print("|---|---|---:|---:|---|---|")
    for name, rws in [(k, r["rows"]) for k, r in result["batched"].items()] + [("separate", result["separate_rows"])]:
        for r in rws:
            print(f"| {r['name']} | {name} | {float(r['time_s']):.1f} | {float(r['kl_mean']):.4f} | "
                  f"{float(r['ppl_merged']):.1f} -> {float(r['ppl_quant']):.1f} | "
                  f"{int(r['bytes_before']) / 1e6:.1f} -> {int(r['bytes_after']) / 1e6:.1f} |")
    if args.command == "batch":  # the same models scored on both sides: the accuracies must agree
        print("\n| checkpoint | path | mean acc | +- | decode ms/token |")
        print("|---|---|---:|---:|---:|")
        outs = [(k, work / f"batched-{k}") for k in result["batched"]]
        outs += [("separate", work / "separate" / str(i)) for i in range(n)]
        for name, out in outs:
            for r in csv.DictReader((out / "batch.csv").open()):
                print(f"| {r['name']} | {name} | {r['mean_acc']} | {r['mean_acc_stderr']} | {r['decode_ms']} |")
    print(f"\nresults: {work / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
