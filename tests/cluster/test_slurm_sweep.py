"""The whole thing on a real one-node Slurm: `refinery cluster slurm SWEEP.yaml` submits the sweep
driver with a Ray head in the allocation; `scontrol requeue` of the job while a trial trains; the
requeued job resumes the sweep: no finished configuration re-runs, the interrupted trial resumes
from the checkpoint its SIGTERM wrote, every configuration ends with one complete run."""
from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import yaml
from test_slurm import free_port, job_info, jobs, start_now, wait_for  # noqa: F401  (jobs: the fixture)

from refinery.cluster.slurm import status
from refinery.core.manifest import read_jsonl
from refinery.launch.cli import main as cli_main


def main(argv):
    return cli_main(["cluster", "slurm", *argv])

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _steps(run: Path) -> list[int]:
    path = run / "distill" / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path)] if path.is_file() else []


def test_sweep_job_survives_scontrol_requeue(slurm_cluster, jobs, tmp_path, tiny_sweep, monkeypatch, capsys):  # noqa: F811
    cfg, sweep_dir = tiny_sweep
    sweep = yaml.safe_load(cfg.read_text())
    sweep["num_samples"] = 2
    cfg.write_text(yaml.safe_dump(sweep))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    # sbatch exports this environment to the job: the checkout's code, one thread per process
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "ray" / "auth_token"))
    monkeypatch.chdir(tmp_path)
    assert main([str(cfg), "--cpus-per-task", str(slurm_cluster.cpus), "--time", "30", "--signal-lead", "0",
                 "--ray-port", str(free_port()), "--ray-head-arg=--include-dashboard=false",
                 f"--ray-head-arg=--ray-client-server-port={free_port()}"]) == 0
    job_id = re.search(r"submitted job (\d+)", capsys.readouterr().out).group(1)
    jobs.append(job_id)
    info = lambda: job_info(slurm_cluster, sweep_dir, job_id) + "".join(
        f"\n--- {p}\n{p.read_text()[-2500:]}" for p in sorted((sweep_dir / "runs").glob("*/trial.log")))

    def mid_trial():  # one configuration finished, the other one training
        if not list((sweep_dir / "results").glob("*.json")):
            return None
        training = [r for r in (sweep_dir / "runs").iterdir()
                    if not (r / "distill" / "manifest.json").exists() and len(_steps(r)) >= 2]
        return training[0] if training else None

    run = wait_for(mid_trial, 900, "one finished configuration and another mid-distill", info)
    finished = {p.parent.parent.name: p.stat().st_mtime for p in (sweep_dir / "runs").glob("*/evaluate/manifest.json")}
    done_before = len(_steps(run))
    slurm_cluster.run("scontrol", "requeue", job_id)  # preemption: SIGTERM to the job, then pending again

    st = wait_for(lambda: (s := status(job_id)).state == "PENDING" and s, 120, "the job to be pending again", info)
    assert st.restarts == 1, info()
    start_now(slurm_cluster, job_id)  # skip the requeue delay
    st = wait_for(lambda: (s := status(job_id)).state not in ("PENDING", "RUNNING", "COMPLETING") and s, 900,
                  "the requeued job to end", info)
    assert (st.state, st.exit_code, st.restarts) == ("COMPLETED", "0:0", 1), info()

    log = (sweep_dir / "slurm" / "logs" / f"refinery-sweep-{job_id}.out").read_text()
    # (the first run's own end is not asserted: Slurm SIGKILLs what is left after KillWait, and a busy
    # machine may not stop Tune's trials in time; what matters is the trial's checkpoint, below)
    assert "got SIGTERM" in log and log.rstrip().endswith("exit 0"), log
    assert len(list((sweep_dir / "results").glob("*.json"))) == 2, info()
    runs = sorted((sweep_dir / "runs").iterdir())
    assert len(runs) == 2, runs  # one run per configuration: nothing started twice
    for r in runs:
        assert _steps(r) == list(range(1, 7)), (r, _steps(r))
        assert json.loads((r / "evaluate" / "results.json").read_text())["models"]["student_quant"]["mean_acc"] >= 0
    for name, mtime in finished.items():  # the configuration finished before the requeue was not re-run
        assert (sweep_dir / "runs" / name / "evaluate" / "manifest.json").stat().st_mtime == mtime
    # the interrupted trial checkpointed the step it was in when SIGTERM came, and resumed there
    resumed = [int(m) for m in re.findall(r"distill: resumed from \S+ \(step (\d+) of 6\)",
                                          (run / "trial.log").read_text())]
    assert len(resumed) == 1 and resumed[0] >= done_before, (resumed, done_before, info())
    assert f"distill: signal {int(signal.SIGTERM)}: checkpointed step {resumed[0]}, stopping" in \
        (run / "trial.log").read_text()
