"""The quickstart sweep on a 2-node Ray cluster, with one node killed mid-trial.

    python benchmarks/two_node_sweep.py                       # 4 configurations, 1 seed: ~45 min on 2 cores
    python benchmarks/two_node_sweep.py --num-samples 6 --replicates 2 --out runs/two-node-sweep-full

Two simulated hosts (tests/hosts.py: network, UTS and mount namespaces; needs root), `ray start` on
each with 1 CPU, then `refinery sweep configs/sweep-quickstart.yaml --address HEAD` on the first one
(max_concurrent 2, cpus_per_trial 1: one trial per node). When a trial on node-1 has written its first
distill checkpoint, every process of node-1 is SIGKILLed. The table: each configuration's attempts
(host, distill steps trained, where it resumed), its objective, and the totals (trials per node,
steps trained twice, finished configurations re-run). Summary in `<out>/two_node_summary.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from hosts import Hosts, unavailable  # noqa: E402


def _attempts(run: Path) -> list[dict]:
    """Each start of this run's chain: host, and the step its distill resumed from (0: from scratch)."""
    text = (run / "trial.log").read_text(errors="replace") if (run / "trial.log").is_file() else ""
    parts = re.split(r"\[trial\] \S+ chain of \S+ starts on host (\S+)\n", text)[1:]
    out = []
    for host, body in zip(parts[::2], parts[1::2]):
        m = re.search(r"distill: resumed from \S+ \(step (\d+) of", body)
        out.append({"host": host, "resumed_from": int(m.group(1)) if m else 0})
    return out


def _steps(run: Path) -> list[int]:
    path = run / "distill" / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default="configs/sweep-quickstart.yaml")
    p.add_argument("--out", default="runs/two-node-sweep")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--replicates", type=int, default=1)
    p.add_argument("--no-kill", action="store_true", help="leave both nodes up")
    args = p.parse_args()
    why = unavailable()
    if why:
        print(f"two_node_sweep: {why}", file=sys.stderr)
        return 2
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    hosts = Hosts(2)
    t0 = time.time()
    killed = None
    try:
        env = {**os.environ, **hosts.start_ray(out), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "refinery.launch.cli", "sweep", args.sweep, "--address", env["RAY_ADDRESS"],
               f"sweep_dir={out}", f"num_samples={args.num_samples}", f"replicates={args.replicates}",
               "max_concurrent=2", "cpus_per_trial=1"]
        print("driver on node-0:", " ".join(cmd), flush=True)
        driver = hosts.start(0, cmd, out / "driver.log", env, cwd=ROOT)
        while driver.poll() is None:
            if killed is None and not args.no_kill:
                for run in sorted((out / "runs").glob("*")) if (out / "runs").is_dir() else []:
                    tries = _attempts(run)
                    on_1 = tries and tries[-1]["host"] == "node-1"
                    if on_1 and list((run / "distill" / "checkpoints").glob("step-*")) and \
                            not (run / "distill" / "manifest.json").exists():
                        killed = {"run": run.name, "at_s": round(time.time() - t0, 1), "steps_done": len(_steps(run)),
                                  "processes": hosts.kill(1)}
                        print(f"killed node-1 at {killed['at_s']} s: {killed}", flush=True)
                        break
            time.sleep(1)
        code = driver.returncode
    finally:
        hosts.close()
    wall = time.time() - t0
    rows = []
    for run in sorted((out / "runs").glob("*")):
        key = run.name.rsplit("-r", 1)[0]
        res = out / "results" / f"{key}.json"
        steps = _steps(run)
        rows.append({"run": run.name, "attempts": _attempts(run), "steps": len(steps),
                     "steps_twice": len(steps) - len(set(steps)),
                     "objective": json.loads(res.read_text())["objective"] if res.is_file() else None})
    first = [r["attempts"][0]["host"] for r in rows if r["attempts"]]
    summary = {"command": " ".join(sys.argv), "driver_exit": code, "wall_s": round(wall, 1), "killed": killed,
               "trials_started_per_node": {h: first.count(h) for h in sorted(set(first))},
               "configurations_finished": len(list((out / "results").glob("*.json"))), "runs": rows}
    (out / "two_node_summary.json").write_text(json.dumps(summary, indent=1))
    print("\n| run | attempts (host: resumed from step) | distill steps | steps twice | objective |\n|---|---|---|---|---|")
    for r in rows:
        att = ", ".join(f"{a['host']}: {a['resumed_from']}" for a in r["attempts"])
        obj = f"{r['objective']:.4f}" if r["objective"] is not None else "-"
        print(f"| {r['run']} | {att} | {r['steps']} | {r['steps_twice']} | {obj} |")
    print(f"\ndriver exit {code}, wall {wall / 60:.1f} min, trials started per node "
          f"{summary['trials_started_per_node']}, configurations finished {summary['configurations_finished']}, "
          f"node-1 killed: {killed}")
    return code


if __name__ == "__main__":
    sys.exit(main())
