"""`refinery sweep` on the tiny models: 3 configurations, the driver SIGKILLed mid-sweep, the same
command resumes; nothing finished re-runs, outputs (table, best config, plots, status) are written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from refinery.core.manifest import read_jsonl

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _files(tmp: Path, teacher: str, student: str, write_data) -> tuple[Path, Path]:
    base = {"models": {"teacher": teacher, "student": {"path": student}},
            "tasks": {"names": ["siqa", "strategyqa"], "eval_limit": 8},
            "distill": {"steps": 6, "batch_size": 2, "max_seq_len": 48, "checkpoint_every": 2,
                        "lora": {"r": 4, "alpha": 8}, "optim": {"warmup_steps": 1}},
            "quantize": {"calibration_samples": 8, "error_samples": 2},
            "evaluate": {"models": ["student_quant"], "batch_size": 8, "latency": {"enabled": False}}}
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    sweep_dir = tmp / "sweep"
    write_data(sweep_dir / "shared")  # stands in for the shared generate stage
    sweep = {"base": str(tmp / "base.yaml"), "sweep_dir": str(sweep_dir), "num_samples": 3, "seed": 1,
             "space": {"distill.optim.lr": {"type": "loguniform", "low": 0.002, "high": 0.05},
                       "quantize.group_size": {"type": "choice", "values": [32, 64]}}}
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp / "sweep.yaml", sweep_dir


def _sweep(cfg: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "refinery.launch.cli", "sweep", str(cfg)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_sweep_survives_kill_9_of_the_driver(tmp_path, tiny_teacher, tiny_student, write_train_data):
    cfg, sweep_dir = _files(tmp_path, tiny_teacher, tiny_student, write_train_data)
    proc = _sweep(cfg, tmp_path / "first.log")
    deadline = time.time() + 900
    # wait for one finished configuration and a second one under way
    while time.time() < deadline and proc.poll() is None:
        done = list((sweep_dir / "results").glob("*.json"))
        running = list((sweep_dir / "runs").glob("*/.trial.pid")) if (sweep_dir / "runs").is_dir() else []
        if done and running:
            break
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    first = {p.parent.parent.name: p.stat().st_mtime for p in (sweep_dir / "runs").glob("*/evaluate/manifest.json")}
    assert first  # at least one configuration was complete when the driver died
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: its trial process is left behind
    proc.wait()

    proc = _sweep(cfg, tmp_path / "second.log")
    assert proc.wait(timeout=1800) == 0, (tmp_path / "second.log").read_text()[-3000:]
    results = sorted((sweep_dir / "results").glob("*.json"))
    assert len(results) == 3  # 3 configurations, none repeated
    runs = sorted(p for p in (sweep_dir / "runs").iterdir())
    assert len(runs) == 3
    for run in runs:  # every step trained once, every stage complete
        steps = [r["step"] for r in read_jsonl(run / "distill" / "metrics.jsonl")]
        assert steps == list(range(1, 7)), (run, steps)
    for name, mtime in first.items():  # the finished trials were not re-run
        assert (sweep_dir / "runs" / name / "evaluate" / "manifest.json").stat().st_mtime == mtime
    table = (sweep_dir / "results.csv").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("order,key,distill.optim.lr,quantize.group_size,objective")
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    scores = [json.loads(p.read_text())["objective"] for p in results]
    assert best["distill"]["optim"]["lr"] in [json.loads(p.read_text())["params"]["distill.optim.lr"]
                                              for p in results]
    assert max(scores) >= min(scores)
    assert (sweep_dir / "plots" / "objective.png").stat().st_size > 0
    status = subprocess.run([sys.executable, "-m", "refinery.launch.cli", "sweep", "status", str(sweep_dir)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert "3 of 3 configurations finished" in status.stdout and "driver not running" in status.stdout
    # nothing of ours left running: trial processes (their args hold the sweep dir), Ray of either driver
    from refinery.cluster.sweep import _ray_temp

    tags = [str(sweep_dir).encode(), _ray_temp(sweep_dir.resolve()).encode()]
    mine = [d for d in Path("/proc").iterdir() if d.name.isdigit() and any(t in _cmd(d) for t in tags)]
    assert mine == [], [_cmd(d)[:200] for d in mine]


def _cmd(d: Path) -> bytes:
    try:
        return (d / "cmdline").read_bytes()
    except OSError:
        return b""
