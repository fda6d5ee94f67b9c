"""Quickstart benchmark: wall time per stage, bytes, per-token latency (fp vs 4-bit), accuracy.

    python benchmarks/quickstart.py                # runs `refinery run configs/quickstart.yaml` in a fresh run dir
    python benchmarks/quickstart.py --run-dir runs/quickstart --no-run   # tables of a finished run

All numbers come from the run's own manifests and evaluate/results.json, so they are the ones the
pipeline measured in that single run (teacher, fp student and 4-bit student side by side).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = ["generate", "distill", "quantize", "evaluate", "report"]
MODELS = ["teacher", "student_base", "student", "student_quant"]


def _manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def stage_table(run_dir: Path) -> list[str]:
    rows = ["| stage | wall s | key metrics |", "|---|---:|---|"]
    total = 0.0
    for stage in STAGES:
        m = _manifest(run_dir, stage)
        total += m["wall_s"]
        met = m["metrics"]
        keys = {"generate": ["engine", "rows", "tokens_per_s"], "distill": ["steps", "first_loss", "last_loss", "tokens_per_s"],
                "quantize": ["quantize_s", "merged_bytes", "gptq_bytes"], "evaluate": [], "report": []}[stage]
        shown = ", ".join(f"{k}={met[k]}" for k in keys if k in met)
        rows.append(f"| {stage} | {m['wall_s']:.1f} | {shown} |")
    rows.append(f"| **total** | **{total:.1f}** | |")
    return rows


def model_table(run_dir: Path) -> list[str]:
    res = json.loads((run_dir / "evaluate" / "results.json").read_text())["models"]
    rows = ["| model | MB on disk | mean acc | decode ms/token | prefill tok/s |", "|---|---:|---:|---:|---:|"]
    for name in MODELS:
        if name not in res:
            continue
        r = res[name]
        lat = r.get("latency") or {}
        rows.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {r['mean_acc']:.3f} | "
                    f"{lat.get('decode_ms_per_token', float('nan')):.1f} | {lat.get('prefill_tokens_per_s', float('nan')):.0f} |")
    ratios = []
    if {"teacher", "student_quant"} <= set(res):
        ratios.append(f"teacher / 4-bit student bytes: {res['teacher']['bytes'] / res['student_quant']['bytes']:.2f}x")
    if {"student", "student_quant"} <= set(res):
        ratios.append(f"fp student / 4-bit student bytes: {res['student']['bytes'] / res['student_quant']['bytes']:.2f}x")
        a, b = res["student"].get("latency"), res["student_quant"].get("latency")
        if a and b:
            ratios.append(f"4-bit / fp student decode ms/token: {b['decode_ms_per_token'] / a['decode_ms_per_token']:.2f}x")
    return rows + [""] + [f"- {r}" for r in ratios]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/bench-quickstart")
    p.add_argument("--no-run", action="store_true", help="only print the tables of an existing run")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    run_dir = Path(args.run_dir)
    if not args.no_run:
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.time()
        cmd = [sys.executable, "-m", "refinery.launch.cli", "run", "configs/quickstart.yaml",
               f"run_dir={run_dir}", *args.overrides]
        subprocess.run(cmd, check=True)
        print(f"\nwhole command: {time.time() - start:.0f} s")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("\n".join(stage_table(run_dir)))
    print()
    print("\n".join(model_table(run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
