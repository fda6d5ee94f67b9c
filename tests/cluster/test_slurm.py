"""`refinery cluster slurm`: the batch script, and jobs on a real one-node Slurm (tests/cluster/conftest.py).

Without Slurm: the script's content and bash syntax, its signal handling run under plain bash with a
fake `scontrol`, config checks, submit's errors. With Slurm: a driver that counts once per second and
checkpoints on SIGTERM/SIGUSR1 survives `scontrol requeue`, and USR1 before the time limit (a
self-requeue), without losing a count; the driver's exit code is the job's; a Ray head starts inside
the allocation and is gone after.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from refinery.cluster.slurm import (
    SlurmConfig,
    SlurmError,
    parse_scontrol,
    sbatch_script,
    status,
    submit,
    time_limit_s,
)
from refinery.core.config import ConfigError, build
from refinery.launch.cli import main as cli_main


def main(argv):
    return cli_main(["cluster", "slurm", *argv])


# The driver stand-in: counts once per second into progress.txt; on SIGTERM/SIGUSR1 it saves the
# count and exits 128+signal (as refinery's training does); on start it resumes from the save.
COUNTER = r'''
import json, os, signal, sys, time
from pathlib import Path

state, total = Path(sys.argv[1]), int(sys.argv[2])
ckpt, progress = state / "ckpt.json", state / "progress.txt"
stop = []
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda signum, frame: stop.append(signum))

def log(msg):
    with progress.open("a") as f:
        f.write(msg + "\n")

n = json.loads(ckpt.read_text())["n"] if ckpt.exists() else 0
log(f"start {n} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}")
while n < total:
    until = time.monotonic() + 1
    while time.monotonic() < until and not stop:
        time.sleep(0.05)
    if stop:
        tmp = state / "ckpt.json.tmp"
        tmp.write_text(json.dumps({"n": n}))
        os.replace(tmp, ckpt)
        log(f"checkpointed {n} signal={stop[0]}")
        sys.exit(128 + stop[0])
    n += 1
    log(f"count {n}")
log(f"done {n}")
'''


def counter_command(tmp_path: Path, total: int) -> tuple[list[str], Path]:
    state = tmp_path / "state"
    state.mkdir()
    script = tmp_path / "counter.py"
    script.write_text(COUNTER)
    return [sys.executable, str(script), str(state), str(total)], state / "progress.txt"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def counts(path: Path) -> list[int]:
    return [int(x.split()[1]) for x in lines(path) if x.startswith("count ")]


def wait_for(pred, timeout: float, what: str, info=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{info()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the script, no Slurm needed


def test_script_content():
    cfg = SlurmConfig(nodes=3, cpus_per_task=8, gpus_per_node=2, time="12:00:00", partition="gpu",
                      job_name="sw1", signal_lead_s=240, extra_sbatch=["--account=abc"], setup=["module load cuda"])
    s = sbatch_script(cfg, ["refinery", "sweep", "/a b/sweep.yaml", "--address", "auto"], "/runs/sw", "/work")
    sbatch = [line for line in s.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH --job-name=sw1", "#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1",
                      "#SBATCH --cpus-per-task=8", "#SBATCH --time=12:00:00", "#SBATCH --chdir=/work",
                      "#SBATCH --output=/runs/sw/slurm/logs/%x-%j.out", "#SBATCH --open-mode=append",
                      "#SBATCH --partition=gpu", "#SBATCH --gres=gpu:2", "#SBATCH --requeue",
                      "#SBATCH --signal=B:USR1@240", "#SBATCH --account=abc"]
    assert s.startswith("#!/bin/bash\n")
    assert "driver=(refinery sweep '/a b/sweep.yaml' --address auto)" in s
    assert "module load cuda" in s
    assert "trap 'on_signal USR1' USR1" in s and "trap 'on_signal TERM' TERM" in s
    assert 'kill -"$1" "$driver_pid"' in s  # forwarded to the driver
    assert 'scontrol requeue "$SLURM_JOB_ID"' in s
    assert 'nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))' in s
    head = re.search(r'srun --nodes=1 --ntasks=1 --cpus-per-task=8 --gres=gpu:2 -w "\$head_node" \\\n'
                     r'  ray start --head --block .*--port=6379 --num-cpus=8 --num-gpus=2 &', s)
    worker = re.search(r'srun --nodes=1 --ntasks=1 --cpus-per-task=8 --gres=gpu:2 -w "\$node" \\\n'
                       r' +ray start --address "\$ray_address" --block --num-cpus=8 --num-gpus=2 &', s)
    assert head and worker
    assert s.index("ray start --head") < s.index('until ray status') < s.index("ray start --address")
    assert s.index('export RAY_ADDRESS') < s.index('"${driver[@]}" &')
    assert s.rstrip().endswith("finish $?")  # the driver's exit code is the job's
    assert "export RAY_AUTH_MODE=token" in s and "export RAY_AUTH_TOKEN=" in s
    assert "export RAY_AUTH_MODE=disabled" in sbatch_script(SlurmConfig(ray_auth="disabled"), ["x"], "/r")
    subprocess.run(["bash", "-n"], input=s, text=True, check=True)


def test_script_options_off():
    s = sbatch_script(SlurmConfig(requeue=False, signal_lead_s=0, start_ray=False), ["true"], "/runs/sw")
    assert "#SBATCH --no-requeue" in s and "#SBATCH --requeue" not in s
    assert "--signal" not in s and "--gres" not in s and "--partition" not in s
    assert "ray start --head" not in s and "ray start --address" not in s and "RAY_ADDRESS" not in s
    subprocess.run(["bash", "-n"], input=s, text=True, check=True)


def test_config_checks():
    assert build(SlurmConfig, {"nodes": 2, "time": "1-00:00:00"}).nodes == 2
    assert [time_limit_s(t) for t in ("90", "1:30", "02:00:00", "1-2", "1-0:0:5", "UNLIMITED")] == \
        [5400, 90, 7200, 93600, 86405, None]
    for bad, field in [({"nodes": 0}, "nodes"), ({"time": "2h"}, "time"), ({"extra_sbatch": ["account=x"]},
                       "extra_sbatch[0]"), ({"time": "4", "signal_lead_s": 300}, "signal_lead_s"),
                       ({"job_name": "a b"}, "job_name"), ({"gpus": 1}, "gpus")]:
        with pytest.raises(ConfigError, match=re.escape(field)):
            build(SlurmConfig, bad)


def _run_script_locally(tmp_path, sig: signal.Signals) -> tuple[int, list[str], list[str], str]:
    """Run the batch script under plain bash (fake scontrol), send `sig` to bash alone once the driver counts."""
    command, progress = counter_command(tmp_path, total=30)
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_script(SlurmConfig(start_ray=False), command, tmp_path))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    (fake / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "localhost"}
    p = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(counts(progress)) >= 2, 30, "the driver to count")
        os.kill(p.pid, sig)  # bash only, like --signal=B:USR1: the driver gets it from the trap
        out, _ = p.communicate(timeout=30)
    finally:
        p.kill()
    return p.returncode, lines(progress), lines(tmp_path / "scontrol.calls"), out


def test_usr1_forwarded_then_requeue(tmp_path):
    rc, progress, calls, out = _run_script_locally(tmp_path, signal.SIGUSR1)
    n = counts(tmp_path / "state" / "progress.txt")[-1]
    assert progress[-1] == f"checkpointed {n} signal={int(signal.SIGUSR1)}", out
    assert rc == 128 + signal.SIGUSR1
    assert calls == ["requeue 42"], out


def test_term_forwarded_no_requeue(tmp_path):
    rc, progress, calls, out = _run_script_locally(tmp_path, signal.SIGTERM)
    assert progress[-1].startswith("checkpointed ") and progress[-1].endswith(f"signal={int(signal.SIGTERM)}")
    assert rc == 143, out
    assert calls == [], out  # Slurm requeues (or cancels) by itself after a TERM


def test_parse_scontrol():
    f = parse_scontrol("JobId=7 JobName=a b JobState=PENDING Reason=BeginTime Restarts=1 ExitCode=0:0 "
                       "NtasksPerN:B:S:C=0:0:*:* Command=/x/job.sbatch")
    assert f["JobName"] == "a b" and f["JobState"] == "PENDING" and f["Restarts"] == "1"
    assert f["NtasksPerN:B:S:C"] == "0:0:*:*" and f["Command"] == "/x/job.sbatch"


def test_submit_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SlurmError, match="install slurm-wlm or run the sweep locally"):
        submit(SlurmConfig(), ["true"], tmp_path / "sw")
    assert (tmp_path / "sw" / "slurm" / "job.sbatch").is_file()  # written before sbatch runs
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid account' >&2\n"
                                 "exit 1\n")
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    with pytest.raises(SlurmError, match="rejected .*job.sbatch .*Invalid account"):
        submit(SlurmConfig(), ["true"], tmp_path / "sw")
    assert not (tmp_path / "sw" / "slurm" / "jobs.json").exists()


def test_cli_dry_run(tmp_path, capsys, monkeypatch):
    repo = Path(__file__).parents[2]
    monkeypatch.chdir(repo)  # the sweep config names its base config relative to the checkout
    sweep = tmp_path / "sw"
    assert main(["configs/sweep-quickstart.yaml", "--nodes", "2", f"sweep_dir={sweep}", "--gpus-per-node", "1",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"driver=(refinery sweep {repo}/configs/sweep-quickstart.yaml sweep_dir={sweep} --address auto)" in out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --gres=gpu:1" in out and f"#SBATCH --chdir={repo}" in out
    assert f"#SBATCH --output={sweep}/slurm/logs/%x-%j.out" in out  # sweep_dir from the sweep config
    assert not sweep.exists()
    assert main(["configs/sweep-quickstart.yaml", "--time", "2h", "--dry-run"]) == 2
    assert "time: got '2h'" in capsys.readouterr().err
    assert main(["configs/sweep-quickstart.yaml", "num_samples=0", "--dry-run"]) == 2  # checked before submitting
    assert "num_samples" in capsys.readouterr().err


# ---------------------------------------------------------------- a real one-node Slurm


@pytest.fixture
def jobs(slurm_cluster):
    """Job ids a test submitted; cancelled at teardown (only those)."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        slurm_cluster.run("scancel", job_id, check=False)


def job_info(cluster, sweep_dir: Path, job_id: str) -> str:
    logs = "\n".join(p.read_text() for p in (sweep_dir / "slurm" / "logs").glob("*.out"))
    return f"status: {status(job_id)}\njob log:\n{logs}\nslurmctld log tail:\n{cluster.log()[-1500:]}"


def test_submit_records_job_and_exit_code(slurm_cluster, jobs, tmp_path):
    sweep = tmp_path / "sw"
    cfg = SlurmConfig(start_ray=False, cpus_per_task=1, time="5", signal_lead_s=0)
    job_id = submit(cfg, [sys.executable, "-c", "import sys; sys.exit(3)"], sweep)
    jobs.append(job_id)
    st = wait_for(lambda: (s := status(job_id)).state not in ("PENDING", "RUNNING", "COMPLETING") and s, 60,
                  "the job to end", lambda: job_info(slurm_cluster, sweep, job_id))
    assert (st.state, st.exit_code) == ("FAILED", "3:0")
    record = json.loads((sweep / "slurm" / "jobs.json").read_text())
    assert [r["job_id"] for r in record] == [job_id]
    assert record[0]["slurm"]["cpus_per_task"] == 1
    assert "exit 3" in (sweep / "slurm" / "logs" / f"refinery-sweep-{job_id}.out").read_text()
    with pytest.raises(SlurmError, match="invalid partition"):
        submit(SlurmConfig(partition="nope", start_ray=False), ["true"], sweep)


def start_now(cluster, job_id: str, *update: str) -> None:
    """Start a requeued job now instead of after its ~2 min EligibleTime. Not in the second of the
    requeue: slurmd refuses a job credential no newer than the revoked one ("Killing non-startable
    batch JobId=3: Job credential revoked", seen when the restart followed the requeue within 1 s)."""
    time.sleep(2)
    cluster.run("scontrol", "update", f"jobid={job_id}", "StartTime=now", *update)


def _requeue_and_finish(cluster, sweep: Path, job_id: str, progress: Path, signum: int, total: int,
                        update: tuple[str, ...] = (), timeout: float = 30) -> None:
    """After a signal made the job checkpoint: it is pending again; start it now; it resumes and completes."""
    info = lambda: job_info(cluster, sweep, job_id) + "\nprogress:\n" + "\n".join(lines(progress))
    ckpt = wait_for(lambda: [x for x in lines(progress) if x.startswith("checkpointed")], timeout, "the checkpoint",
                    info)
    assert ckpt[0].endswith(f"signal={signum}"), info()
    n = int(ckpt[0].split()[1])
    st = wait_for(lambda: (s := status(job_id)).state == "PENDING" and s, 60, "the job to be pending again", info)
    assert st.restarts == 1, info()
    # a requeued job may start only ~2 min later (EligibleTime); StartTime=now skips the wait
    assert (datetime.fromisoformat(st.fields["EligibleTime"]) - datetime.now()).total_seconds() > 60, info()
    start_now(cluster, job_id, *update)
    st = wait_for(lambda: (s := status(job_id)).state == "COMPLETED" and s, 90, "the job to complete", info)
    assert st.exit_code == "0:0" and st.restarts == 1
    got = lines(progress)
    assert got[0] == "start 0 restart=0" and f"start {n} restart=1" in got, info()
    assert counts(progress) == list(range(1, total + 1)), info()  # resumed where it stopped, no count lost
    assert got[-1] == f"done {total}"


def test_scontrol_requeue_checkpoints_and_resumes(slurm_cluster, jobs, tmp_path):
    sweep, total = tmp_path / "sw", 7
    command, progress = counter_command(tmp_path, total)
    job_id = submit(SlurmConfig(start_ray=False, cpus_per_task=1, time="10"), command, sweep)
    jobs.append(job_id)
    wait_for(lambda: len(counts(progress)) >= 2, 60, "the driver to count",
             lambda: job_info(slurm_cluster, sweep, job_id))
    slurm_cluster.run("scontrol", "requeue", job_id)  # what preemption does: SIGTERM, then back to pending
    _requeue_and_finish(slurm_cluster, sweep, job_id, progress, int(signal.SIGTERM), total)
    log = (sweep / "slurm" / "logs" / f"refinery-sweep-{job_id}.out").read_text()
    assert "got SIGTERM" in log and "exit 143" in log and "exit 0" in log


def test_time_limit_usr1_checkpoints_and_requeues_itself(slurm_cluster, jobs, tmp_path):
    # --time=1 (60 s) and --signal=B:USR1@40: Slurm checks limits every ~30 s, so USR1 reaches the batch
    # shell ~20-30 s after the start (measured 27-28 s), well before the limit. Then the trap requeues.
    sweep, total = tmp_path / "sw", 36
    command, progress = counter_command(tmp_path, total)
    job_id = submit(SlurmConfig(start_ray=False, cpus_per_task=1, time="1", signal_lead_s=40), command, sweep)
    jobs.append(job_id)
    # the second run gets a longer limit, else it is signalled again before it can finish
    _requeue_and_finish(slurm_cluster, sweep, job_id, progress, int(signal.SIGUSR1), total,
                        update=("TimeLimit=10",), timeout=75)
    log = (sweep / "slurm" / "logs" / f"refinery-sweep-{job_id}.out").read_text()
    assert "got SIGUSR1" in log and "time limit near: requeueing" in log and "exit 138" in log
    assert "TIME LIMIT" not in log


def _ray_pids(port: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes() if d.name.isdigit() else b""
            if f":{port}".encode() in cmd or f"--port={port}".encode() in cmd:
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


def test_ray_head_starts_in_allocation(slurm_cluster, jobs, tmp_path, monkeypatch):
    sweep, port = tmp_path / "sw", free_port()
    out, token = tmp_path / "ray_status.txt", tmp_path / "ray" / "auth_token"
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))  # sbatch exports it: the job makes its token here
    cfg = SlurmConfig(cpus_per_task=slurm_cluster.cpus, time="10", ray_port=port, ray_start_timeout_s=90,
                      ray_head_args=["--include-dashboard=false", f"--ray-client-server-port={free_port()}"])
    t0 = time.monotonic()
    job_id = submit(cfg, ["bash", "-c", f'echo "$RAY_ADDRESS" > {out}; ray status --address "$RAY_ADDRESS" >> {out}'],
                    sweep)
    jobs.append(job_id)
    st = wait_for(lambda: (s := status(job_id)).state not in ("PENDING", "RUNNING", "COMPLETING") and s, 150,
                  "the Ray job to end", lambda: job_info(slurm_cluster, sweep, job_id))
    wall = time.monotonic() - t0
    assert st.state == "COMPLETED", job_info(slurm_cluster, sweep, job_id)
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text()) and token.stat().st_mode & 0o777 == 0o600
    text = out.read_text()
    assert text.splitlines()[0].endswith(f":{port}")
    assert re.search(rf"0\.0/{slurm_cluster.cpus}\.0 CPU", text), text
    log = (sweep / "slurm" / "logs" / f"refinery-sweep-{job_id}.out").read_text()
    assert "Ray head up after" in log and "stopping Ray" in log
    wait_for(lambda: not _ray_pids(port), 30, "Ray processes to end", lambda: str(_ray_pids(port)))
    head_up = re.search(r"Ray head up after \d+ s", log).group(0)
    print(f"\nRay job wall {wall:.1f} s; {head_up}")
