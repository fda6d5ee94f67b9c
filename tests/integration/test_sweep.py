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

from refinery.core.manifest import read_jsonl, read_jsonl_prefix

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _sweep(cfg: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "refinery.launch.cli", "sweep", str(cfg)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_sweep_survives_kill_9_of_the_driver(tmp_path, tiny_sweep):
    cfg, sweep_dir = tiny_sweep
    proc = _sweep(cfg, tmp_path / "first.log")
    deadline = time.time() + 900
    # wait for one finished configuration and a second one under way
    while time.time() < deadline and proc.poll() is None:
        done = list((sweep_dir / "results").glob("*.json"))
        running = list((sweep_dir / "runs").glob("*/.trial.pid")) if (sweep_dir / "runs").is_dir() else []
        if done and running and running[0].read_text().strip():
            break
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    first = {p.parent.parent.name: p.stat().st_mtime for p in (sweep_dir / "runs").glob("*/evaluate/manifest.json")}
    assert first  # at least one configuration was complete when the driver died
    # the chain leads its own process group: a raylet shutting down SIGKILLs its workers' groups
    chain = int(running[0].read_text())
    assert os.getpgid(chain) == chain, "the trial's chain shares its Ray worker's process group"
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
    assert best["distill"]["optim"]["lr"] in [json.loads(p.read_text())["params"]["distill.optim.lr"]
                                              for p in results]
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


def test_sweep_trials_train_with_ray_train_torchtrainer(tmp_path, tiny_sweep):
    """distill.parallel.launcher=ray: each trial's distill is a 2-worker TorchTrainer on the sweep's Ray
    (and the sweep searches two objectives, accuracy up and bytes down, with Optuna's GPSampler)."""
    cfg, sweep_dir = tiny_sweep
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["distill"]["parallel"] = {"strategy": "ddp", "nproc": 2, "launcher": "ray"}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = yaml.safe_load(cfg.read_text())
    sweep.update(num_samples=2, searcher="gp", objective={"metric": "pareto", "pareto_of": ["accuracy", "bytes"]})
    cfg.write_text(yaml.safe_dump(sweep))
    proc = _sweep(cfg, tmp_path / "sweep.log")
    assert proc.wait(timeout=1200) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    results = [json.loads(p.read_text()) for p in (sweep_dir / "results").glob("*.json")]
    assert len({r["params"]["distill.optim.lr"] for r in results}) == 2  # two distinct proposals, both run
    assert json.loads((sweep_dir / "sweep.json").read_text())["searcher"] == "gp"
    # the searcher got both objectives of every trial (its state: a pickle this test's sweep wrote)
    import pickle

    import optuna

    state = pickle.loads(next((sweep_dir / "tune" / "sweep").glob("searcher-state-*.pkl")).read_bytes())
    study = state["_ot_study"]
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    told = sorted(tuple(t.values) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert told == sorted((r["accuracy"], r["bytes"]) for r in results)
    for run in (sweep_dir / "runs").iterdir():
        log = (run / "trial.log").read_text()
        assert "Ray Train TorchTrainer with 2 workers" in log and "on cpu x 2 (ddp)" in log
        assert json.loads((run / "distill" / "manifest.json").read_text())["metrics"]["world_size"] == 2


def test_asha_stops_a_trial_whose_distill_loss_lags(tmp_path, tiny_sweep):
    """Seeded TPE proposes lr 0.02 then 1e-6: at the first rung the 1e-6 trial's loss is far behind, so
    ASHA stops it before quantize/evaluate; the good one finishes and is the best config."""
    cfg, sweep_dir = tiny_sweep
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["distill"]["steps"] = 12
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = yaml.safe_load(cfg.read_text())
    sweep.update(num_samples=3, scheduler="asha", asha={"grace_steps": 4, "reduction_factor": 2, "report_every": 2},
                 space={"distill.optim.lr": {"type": "choice", "values": [0.000001, 0.02]}})
    cfg.write_text(yaml.safe_dump(sweep))
    proc = _sweep(cfg, tmp_path / "sweep.log")
    assert proc.wait(timeout=1200) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    finished = [json.loads(p.read_text()) for p in (sweep_dir / "results").glob("*.json")]
    assert [r["params"]["distill.optim.lr"] for r in finished] == [0.02]
    stopped = json.loads((sweep_dir / "unfinished.json").read_text())
    assert [(r["params"]["distill.optim.lr"], r["why"], r["distill_step"]) for r in stopped] == \
        [(0.000001, "stopped early by ASHA", 4)]
    assert not (sweep_dir / "runs" / f"{stopped[0]['key']}-r0" / "evaluate" / "manifest.json").exists()
    assert yaml.safe_load((sweep_dir / "best.yaml").read_text())["distill"]["optim"]["lr"] == 0.02


def test_sigterm_stops_the_sweep_cleanly_and_the_rerun_finishes(tmp_path, tiny_sweep):
    """What Slurm sends on requeue: the driver stops its trials (they checkpoint), exits 143; rerun resumes."""
    cfg, sweep_dir = tiny_sweep
    sweep = yaml.safe_load(cfg.read_text())
    sweep["num_samples"] = 2
    cfg.write_text(yaml.safe_dump(sweep))
    proc = _sweep(cfg, tmp_path / "first.log")
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        losses = list((sweep_dir / "runs").glob("*/distill/metrics.jsonl")) if (sweep_dir / "runs").is_dir() else []
        if losses and len(read_jsonl(losses[0])) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, (tmp_path / "first.log").read_text()[-3000:]
    assert "rerun the same command to resume" in (tmp_path / "first.log").read_text()
    run = next((sweep_dir / "runs").iterdir())
    pid = (run / ".trial.pid").read_text() if (run / ".trial.pid").exists() else None
    for _ in range(50):  # the chain got SIGTERM with its trial (PDEATHSIG) and is gone
        if not pid or not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.2)
    assert not pid or not Path(f"/proc/{pid}").exists(), "the trial's chain was left running"
    proc = _sweep(cfg, tmp_path / "second.log")
    assert proc.wait(timeout=1200) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert len(list((sweep_dir / "results").glob("*.json"))) == 2
    for run in (sweep_dir / "runs").iterdir():
        assert [r["step"] for r in read_jsonl(run / "distill" / "metrics.jsonl")] == list(range(1, 7))


def test_sweep_on_two_nodes_survives_the_death_of_one(tmp_path, tiny_sweep, two_hosts):
    """`refinery sweep --address` on a 2-node Ray cluster (simulated hosts node-0, node-1; 1 CPU each,
    Tune's storage and the trial dirs on the path both see): the two trials run one on each node. Node 1
    dies mid-distill (every process on it SIGKILLed): Tune retries its trial on node 0, which resumes from
    the last checkpoint on the shared path; nothing finished re-runs, no step is trained twice."""
    cfg, sweep_dir = tiny_sweep
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["distill"].update(steps=30, checkpoint_every=2)  # a trial on node 1 still training when it dies
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = yaml.safe_load(cfg.read_text())
    # a path relative to the driver's cwd: the trial actors' nodes were started elsewhere
    sweep.update(num_samples=2, max_concurrent=2, cpus_per_trial=1, base="base.yaml")
    cfg.write_text(yaml.safe_dump(sweep))
    ray_env = two_hosts.start_ray(tmp_path, cpus=1)
    env = {**os.environ, **ray_env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "driver.log"
    driver = two_hosts.start(0, [sys.executable, "-m", "refinery.launch.cli", "sweep", str(cfg), "--address",
                                 ray_env["RAY_ADDRESS"]], log, env, cwd=tmp_path)
    victim, deadline = None, time.time() + 900
    while victim is None and time.time() < deadline and driver.poll() is None:
        for run in (sweep_dir / "runs").glob("*") if (sweep_dir / "runs").is_dir() else []:
            on_1 = (run / "trial.log").is_file() and "starts on host node-1" in (run / "trial.log").read_text()
            if on_1 and list((run / "distill" / "checkpoints").glob("step-*")) and \
                    len(read_jsonl_prefix(run / "distill" / "metrics.jsonl")) < 20:
                victim = run
        time.sleep(0.2)
    assert victim is not None, log.read_text()[-3000:]
    assert two_hosts.kill(1) > 0  # node 1 dies: its raylet, its trial actor and that trial's chain
    assert driver.wait(timeout=1200) == 0, log.read_text()[-3000:]

    results = [json.loads(p.read_text()) for p in (sweep_dir / "results").glob("*.json")]
    assert len(results) == 2
    starts = {run.name: [line.split()[-1] for line in (run / "trial.log").read_text().splitlines()
                         if "starts on host" in line] for run in (sweep_dir / "runs").iterdir()}
    assert starts[victim.name] == ["node-1", "node-0"], starts  # retried on the node that remains
    other = next(name for name in starts if name != victim.name)
    assert starts[other] == ["node-0"], starts  # the trial on node 0 ran once: nothing finished re-ran
    assert "resumed from" in (victim / "trial.log").read_text()
    for run in (sweep_dir / "runs").iterdir():  # every step trained once
        assert [r["step"] for r in read_jsonl(run / "distill" / "metrics.jsonl")] == list(range(1, 31))
    assert {r["replicates"][0]["host"] for r in results} == {"node-0"}
    assert (sweep_dir / "tune" / "sweep").is_dir()  # Tune's state on the shared path


def test_a_sweep_whose_trials_all_fail_exits_nonzero_naming_them(tmp_path, tiny_sweep):
    """Every configuration's chain fails (the base config's student path does not exist; the driver only
    parses the config, each trial's `refinery run` refuses it): after Tune's retry the driver exits 1 and
    names the configurations and where their errors are."""
    cfg, sweep_dir = tiny_sweep
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["models"]["student"]["path"] = str(tmp_path / "no-such-student")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = yaml.safe_load(cfg.read_text())
    sweep.update(num_samples=1)
    cfg.write_text(yaml.safe_dump(sweep))
    proc = _sweep(cfg, tmp_path / "sweep.log")
    assert proc.wait(timeout=600) == 1, (tmp_path / "sweep.log").read_text()[-3000:]
    key = json.loads((sweep_dir / "unfinished.json").read_text())[0]["key"]
    assert f"1 configuration(s) failed for good ({key}): the errors are in {sweep_dir}/unfinished.json" in \
        (tmp_path / "sweep.log").read_text()
    assert "no-such-student" in (sweep_dir / "runs" / f"{key}-r0" / "trial.log").read_text()
