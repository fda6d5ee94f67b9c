"""The whole thing on a real two-node Slurm (simulated hosts node-0 and node-1, tests/hosts.py):
`refinery cluster slurm SWEEP.yaml --nodes 2` submits the sweep driver with a Ray head on the first node
and a Ray worker on the second; trials run on both; `scontrol requeue` of the job while a trial trains;
the requeued job resumes the sweep: no finished configuration re-runs, the interrupted trial resumes
from the checkpoint its SIGTERM wrote, every configuration ends with one complete run."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import yaml
from test_slurm import start_now, wait_for

from refinery.cluster.slurm import parse_scontrol
from refinery.core.manifest import read_jsonl

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _steps(run: Path) -> list[int]:
    path = run / "distill" / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path)] if path.is_file() else []


def _job(cluster, job_id: str) -> dict:
    r = cluster.run("scontrol", "show", "job", "-o", job_id, check=False)
    return parse_scontrol(r.stdout.splitlines()[0]) if r.returncode == 0 and r.stdout.strip() else {}


def _hosts(run: Path) -> list[str]:
    """The hosts each attempt of this run's chain started on, in order."""
    return [line.split()[-1] for line in (run / "trial.log").read_text().splitlines() if "starts on host" in line]


def test_two_node_sweep_job_survives_scontrol_requeue(two_node_slurm, tmp_path, tiny_sweep):
    cluster = two_node_slurm
    cfg, sweep_dir = tiny_sweep
    sweep = yaml.safe_load(cfg.read_text())
    sweep.update(num_samples=3, max_concurrent=2, cpus_per_trial=1)
    cfg.write_text(yaml.safe_dump(sweep))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    # sbatch exports this environment to the job: the checkout's code, one thread per process
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SLURM_CONF=str(cluster.conf),
               RAY_AUTH_TOKEN_PATH=str(tmp_path / "ray" / "auth_token"))
    submit = cluster.hosts.start(0, [sys.executable, "-m", "refinery.launch.cli", "cluster", "slurm", str(cfg),
                                     "--nodes", "2", "--cpus-per-task", "1", "--time", "30", "--signal-lead", "0",
                                     "--ray-head-arg=--include-dashboard=false"], tmp_path / "submit.log", env,
                                 cwd=tmp_path)
    assert submit.wait(timeout=120) == 0, (tmp_path / "submit.log").read_text()
    job_id = re.search(r"submitted job (\d+)", (tmp_path / "submit.log").read_text()).group(1)
    job_log = sweep_dir / "slurm" / "logs" / f"refinery-sweep-{job_id}.out"
    info = lambda: f"job: {_job(cluster, job_id)}\njob log:\n{job_log.read_text() if job_log.exists() else ''}" + \
        "".join(f"\n--- {p}\n{p.read_text()[-2500:]}" for p in sorted((sweep_dir / "runs").glob("*/trial.log")))

    def mid_trial():  # one configuration finished, another one training
        if not list((sweep_dir / "results").glob("*.json")):
            return None
        training = [r for r in (sweep_dir / "runs").iterdir()
                    if not (r / "distill" / "manifest.json").exists() and len(_steps(r)) >= 2]
        return training[0] if training else None

    run = wait_for(mid_trial, 900, "one finished configuration and another mid-distill", info)
    finished = {p.parent.parent.name: p.stat().st_mtime for p in (sweep_dir / "runs").glob("*/evaluate/manifest.json")}
    done_before = len(_steps(run))
    cluster.run("scontrol", "requeue", job_id)  # preemption: SIGTERM to the job on both nodes, then pending again

    job = wait_for(lambda: (j := _job(cluster, job_id)).get("JobState") == "PENDING" and j, 120,
                   "the job to be pending again", info)
    assert job["Restarts"] == "1", info()
    start_now(cluster, job_id)  # skip the requeue delay
    job = wait_for(lambda: (j := _job(cluster, job_id)).get("JobState") not in ("PENDING", "RUNNING", "COMPLETING")
                   and j, 900, "the requeued job to end", info)
    assert (job["JobState"], job["ExitCode"], job["NodeList"]) == ("COMPLETED", "0:0", "node-[0-1]"), info()

    log = job_log.read_text()
    assert log.count("starting Ray worker on node-1") == 2, log  # a Ray node on each host, in both runs
    assert "got SIGTERM" in log and log.rstrip().endswith("exit 0"), log
    assert len(list((sweep_dir / "results").glob("*.json"))) == 3, info()
    runs = sorted((sweep_dir / "runs").iterdir())
    assert len(runs) == 3, runs  # one run per configuration: nothing started twice
    assert {_hosts(r)[0] for r in runs} == {"node-0", "node-1"}, info()  # trials ran on both nodes
    for r in runs:
        assert _steps(r) == list(range(1, 7)), (r, _steps(r))
        assert json.loads((r / "evaluate" / "results.json").read_text())["models"]["student_quant"]["mean_acc"] >= 0
    for name, mtime in finished.items():  # the configuration finished before the requeue was not re-run
        assert (sweep_dir / "runs" / name / "evaluate" / "manifest.json").stat().st_mtime == mtime
        assert len(_hosts(sweep_dir / "runs" / name)) == 1
    # the interrupted trial checkpointed the step it was in when SIGTERM came, and resumed there
    resumed = [int(m) for m in re.findall(r"distill: resumed from \S+ \(step (\d+) of 6\)",
                                          (run / "trial.log").read_text())]
    assert len(resumed) == 1 and resumed[0] >= done_before, (resumed, done_before, info())
    assert f"distill: signal {int(signal.SIGTERM)}: checkpointed step {resumed[0]}, stopping" in \
        (run / "trial.log").read_text()


def test_srun_starts_a_two_node_distill(two_node_slurm, tmp_path, tiny_teacher, tiny_student, write_train_data):
    """`srun --nodes 2 refinery distill CONFIG --nnodes 2`: each node takes its rank from SLURM_NODEID and
    the rendezvous from the allocation's first host (node-0, by name); one rank trains on each node."""
    run = tmp_path / "run"
    write_train_data(run)
    cfg = {"run_dir": str(run), "seed": 0, "models": {"teacher": tiny_teacher, "student": {"path": tiny_student}},
           "tasks": {"names": ["siqa"], "eval_limit": 8},
           "distill": {"steps": 4, "batch_size": 2, "max_seq_len": 48, "checkpoint_every": 2, "lora": {"r": 4}}}
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(cfg))
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = two_node_slurm.run("env", *(f"{k}={v}" for k, v in env.items()), "srun", "--nodes=2", "--ntasks-per-node=1",
                           "--cpus-per-task=1", sys.executable, "-m", "refinery.launch.cli", "distill",
                           str(tmp_path / "distill.yaml"), "--nnodes", "2", check=False, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "node 1 of 2 joins node-0:29400" in r.stdout + r.stderr
    metrics = json.loads((run / "distill" / "manifest.json").read_text())["metrics"]
    assert (metrics["world_size"], metrics["strategy"], metrics["hosts"]) == (2, "ddp", ["node-0", "node-1"])
    assert [r["step"] for r in read_jsonl(run / "distill" / "metrics.jsonl")] == [1, 2, 3, 4]
