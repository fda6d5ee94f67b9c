"""Run a sweep driver as a Slurm batch job, with a Ray cluster over the allocated nodes.

    refinery cluster slurm configs/sweep.yaml --nodes 2 --cpus-per-task 16 --time 12:00:00
    refinery cluster slurm configs/sweep.yaml --dry-run        # print the batch script only

The batch script (`sbatch_script`) starts a Ray head on the first node and a Ray worker on each
other node (one `srun` step per node, `ray start --block`), waits for the head, then runs the
driver (`refinery sweep CONFIG --address auto`) with RAY_ADDRESS set. Preemption: the job is
submitted with `--requeue` and `--signal=B:USR1@<lead>`; on USR1 (time limit near) or SIGTERM
(`scontrol requeue`, preemption, scancel) the script forwards the signal to the driver, which
checkpoints and exits 128+signal, ends the Ray steps, and after USR1 requeues the job itself.
The requeued job runs the same command, which resumes. The driver's exit code is the job's.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from refinery.core.config import (
    check,
    to_dict,
)
from refinery.core.manifest import atomic_path, write_json

_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE)$", re.IGNORECASE)


class SlurmError(RuntimeError):
    """sbatch/scontrol failed or is missing; the message says what to do."""


@dataclass
class SlurmConfig:
    """One Slurm batch job that hosts a Ray cluster and the sweep driver."""

    nodes: int = 1
    """Nodes in the allocation: one Ray node each (the first is the head and runs the driver)."""
    cpus_per_task: int = 2
    """CPUs per node; one task per node, so this is what Ray gets on each node (`--num-cpus`)."""
    gpus_per_node: int = 0
    """GPUs per node (`--gres=gpu:N`, and `--num-gpus` for Ray). 0 = no GPU request."""
    time: str = "01:00:00"
    """Time limit in a Slurm format: MM, HH:MM:SS, D-HH[:MM[:SS]]."""
    partition: str | None = None
    """Slurm partition; None = the cluster's default."""
    job_name: str = "refinery-sweep"
    requeue: bool = True
    """Submit with --requeue, and requeue the job when USR1 announces the time limit."""
    signal_lead_s: int = 300
    """Seconds before the time limit at which Slurm sends USR1 to the batch script (`--signal=B:USR1@N`;
    Slurm may send it up to 60 s earlier). 0 = no such signal."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More sbatch options, one per line, e.g. `--account=abc`, `--mem=0`, `--exclusive`."""
    setup: list[str] = field(default_factory=list)
    """Bash lines run before Ray starts, e.g. `module load cuda`."""
    log_dir: str | None = None
    """Where Slurm writes the job's output (`<job_name>-<job_id>.out`); None = `<sweep_dir>/slurm/logs`."""
    start_ray: bool = True
    """Start Ray on the allocation and set RAY_ADDRESS for the driver; off = run the driver alone."""
    ray_port: int = 6379
    """Port of the Ray head (GCS)."""
    ray_head_args: list[str] = field(default_factory=list)
    """More `ray start --head` options, e.g. `--include-dashboard=false`, `--temp-dir=/scratch/ray`."""
    ray_auth: Literal["token", "disabled"] = "token"
    """Ray token authentication. token: the job uses $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH
    or ~/.ray/auth_token (created, mode 600, when missing), and passes it to every node in the environment."""
    ray_start_timeout_s: int = 180
    """Give up (exit 1) when the Ray head does not answer `ray status` within this time."""

    def __post_init__(self):
        check(self.nodes >= 1, "nodes", self.nodes, "an integer >= 1")
        check(self.cpus_per_task >= 1, "cpus_per_task", self.cpus_per_task, "an integer >= 1")
        check(self.gpus_per_node >= 0, "gpus_per_node", self.gpus_per_node, "an integer >= 0")
        check(bool(_TIME.match(self.time)), "time", self.time, "a Slurm time limit such as 90, 02:00:00 or 1-12:00:00")
        check(bool(re.fullmatch(r"[\w.+-]+", self.job_name)), "job_name", self.job_name,
              "letters, digits and . _ + - only")
        check(self.signal_lead_s >= 0, "signal_lead_s", self.signal_lead_s, "an integer >= 0 (seconds)")
        limit = time_limit_s(self.time)
        check(limit is None or self.signal_lead_s < limit, "signal_lead_s", self.signal_lead_s,
              f"fewer seconds than the time limit {self.time} ({limit} s), or 0: otherwise the job is "
              "signalled and requeued as soon as it starts")
        for i, line in enumerate(self.extra_sbatch):
            check(line.startswith("-") and "\n" not in line, f"extra_sbatch[{i}]", line,
                  "one sbatch option such as --account=abc")
        check(1 <= self.ray_port <= 65535, "ray_port", self.ray_port, "a port number")
        check(self.ray_start_timeout_s >= 1, "ray_start_timeout_s", self.ray_start_timeout_s, "an integer >= 1")


def time_limit_s(limit: str) -> int | None:
    """Seconds in a Slurm time limit (None for UNLIMITED): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    if limit.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
    else:
        h, m, sec = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec


def sbatch_script(cfg: SlurmConfig, command: list[str], sweep_dir: str | Path,
                  workdir: str | Path | None = None) -> str:
    """The bash batch script that runs `command` (the driver) under Ray on the allocation.

    The job runs in `workdir` (default: the current directory), where relative paths in `command`
    and in the configs it reads resolve as they do here.
    """
    log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(sweep_dir) / "slurm" / "logs"
    opts = [f"--job-name={cfg.job_name}", f"--nodes={cfg.nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={cfg.cpus_per_task}", f"--time={cfg.time}",
            f"--chdir={Path(workdir or os.getcwd()).absolute()}",
            f"--output={log_dir.absolute()}/%x-%j.out", "--open-mode=append"]  # a requeued run appends
    if cfg.partition:
        opts.append(f"--partition={cfg.partition}")
    if cfg.gpus_per_node:
        opts.append(f"--gres=gpu:{cfg.gpus_per_node}")
    opts.append("--requeue" if cfg.requeue else "--no-requeue")
    if cfg.signal_lead_s:
        opts.append(f"--signal=B:USR1@{cfg.signal_lead_s}")
    opts += cfg.extra_sbatch
    head = ["#!/bin/bash", *(f"#SBATCH {o}" for o in opts),
            f"# Written by `refinery cluster slurm` for {Path(sweep_dir).absolute()}.",
            "# USR1 (time limit near) or TERM (scontrol requeue, preemption, scancel): forward the signal",
            "# to the driver, which checkpoints and exits 128+signal; after USR1, requeue this job.",
            "set -uo pipefail",
            # the venv that submitted the job: its `refinery` and `ray` (sbatch exports PATH anyway)
            f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\"",
            f"requeue_on_usr1={int(cfg.requeue)}",
            f"driver=({' '.join(shlex.quote(c) for c in command)})",
            *cfg.setup]
    ray = ""
    if cfg.start_ray:
        ray = _RAY_AUTH[cfg.ray_auth] + _RAY.format(
            port=cfg.ray_port, cpus=cfg.cpus_per_task, gpus=cfg.gpus_per_node, timeout=cfg.ray_start_timeout_s,
            step_gres=f" --gres=gpu:{cfg.gpus_per_node}" if cfg.gpus_per_node else "",
            head_args="".join(" " + shlex.quote(a) for a in cfg.ray_head_args))
    return "\n".join(head) + "\n" + _BODY + ray + _DRIVER


_BODY = r"""
log() { echo "[refinery-slurm $(date +%H:%M:%S)] $*"; }
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"
driver_pid=""
got_signal=""
ray_pids=()

on_signal() {  # runs between the commands of the main flow; the driver may also get TERM from Slurm itself
  got_signal=$1
  log "got SIG$1${driver_pid:+, forwarding it to the driver (pid $driver_pid)}"
  [ -n "$driver_pid" ] && kill -"$1" "$driver_pid" 2>/dev/null
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

stop_ray() {
  # End our srun'd Ray steps: srun cancels its step and Slurm kills every process in it (GCS, raylet,
  # workers) on that node. Not `ray stop`: it kills every Ray process of this user on the node,
  # other jobs' included.
  [ ${#ray_pids[@]} -eq 0 ] && return 0
  log "stopping Ray"
  kill -TERM "${ray_pids[@]}" 2>/dev/null
  local i p alive
  for i in $(seq 1 30); do
    alive=""
    for p in "${ray_pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 1
  done
  kill -KILL "${ray_pids[@]}" 2>/dev/null
  wait "${ray_pids[@]}" 2>/dev/null
  ray_pids=()
}

finish() {  # finish EXIT_CODE: stop Ray, requeue after USR1, exit
  stop_ray
  if [ -n "$got_signal" ] && [ "$1" != 0 ]; then
    # the driver may die with its Ray (Slurm signals both) before it can exit 128+signal itself
    log "driver exit $1 after SIG$got_signal"
    set -- $((128 + $(kill -l "$got_signal")))
  fi
  if [ "$got_signal" = USR1 ] && [ "$requeue_on_usr1" = 1 ]; then
    log "time limit near: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed"
  fi
  log "exit $1"
  exit "$1"
}
"""

_RAY_AUTH = {
    # Ray >= 2.5x: `ray start --head` turns token auth on by itself when ~/.ray/auth_token exists, but
    # `ray status` does not and is then refused: the mode is set explicitly for every Ray command.
    "token": r"""
export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
  if [ ! -s "$token_file" ]; then
    log "creating a Ray auth token in $token_file"
    (umask 077 && mkdir -p "$(dirname "$token_file")" &&
      head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$token_file")
  fi
  export RAY_AUTH_TOKEN=$(cat "$token_file")  # in the environment: srun passes it to every node
fi
""",
    "disabled": "\nexport RAY_AUTH_MODE=disabled\n",
}

_RAY = r"""
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head_node=${{nodes[0]}}
# The batch script runs on the first node of the allocation, i.e. on the head.
head_ip=$(hostname -I 2>/dev/null | awk '{{print $1}}')
[ -n "$head_ip" ] || head_ip=$(hostname --ip-address | awk '{{print $1}}')
ray_address="$head_ip:{port}"
# On SIGTERM (requeue, preemption) Slurm signals every process of the job at once. A Ray worker
# that exits SIGKILLs its child processes by default, so a trial's chain (a child of its worker)
# would die before it can checkpoint the step it is in: keep the children; they get the SIGTERM
# themselves (and from their parent's death), checkpoint and exit.
export RAY_kill_child_processes_on_worker_exit=0
log "starting Ray head on $head_node ($ray_address)"
srun --nodes=1 --ntasks=1 --cpus-per-task={cpus}{step_gres} -w "$head_node" \
  ray start --head --block --node-ip-address="$head_ip" --port={port} --num-cpus={cpus} --num-gpus={gpus}{head_args} &
ray_pids+=($!)
started=$SECONDS
deadline=$((SECONDS + {timeout}))
# up = `ray status` lists the head's resources (right after the GCS answers it says "No cluster status")
until ray status --address "$ray_address" 2>/dev/null | grep -q " CPU"; do
  [ -n "$got_signal" ] && finish $((128 + $(kill -l "$got_signal")))
  if ((SECONDS > deadline)) || ! kill -0 "${{ray_pids[0]}}" 2>/dev/null; then
    log "Ray head did not come up within {timeout} s"
    finish 1
  fi
  sleep 1
done
log "Ray head up after $((SECONDS - started)) s"
for node in "${{nodes[@]:1}}"; do
  log "starting Ray worker on $node"
  srun --nodes=1 --ntasks=1 --cpus-per-task={cpus}{step_gres} -w "$node" \
    ray start --address "$ray_address" --block --num-cpus={cpus} --num-gpus={gpus} &
  ray_pids+=($!)
done
export RAY_ADDRESS="$ray_address"  # the driver's ray.init(address="auto") connects here
"""

_DRIVER = r"""
[ -n "$got_signal" ] && finish $((128 + $(kill -l "$got_signal")))
log "driver: ${driver[*]}"
"${driver[@]}" &
driver_pid=$!
# a signal trapped between the two lines above was not forwarded yet
[ -n "$got_signal" ] && kill -"$got_signal" "$driver_pid" 2>/dev/null
# `wait` returns early (128+n) when a trapped signal arrives: wait again until the driver is gone,
# then once more for its own exit status (bash keeps it).
while kill -0 "$driver_pid" 2>/dev/null; do wait "$driver_pid"; done
wait "$driver_pid"
finish $?
"""


def submit(cfg: SlurmConfig, command: list[str], sweep_dir: str | Path, workdir: str | Path | None = None) -> str:
    """Write `<sweep_dir>/slurm/job.sbatch`, submit it with sbatch, record the job in jobs.json; return its id."""
    sweep_dir = Path(sweep_dir).absolute()
    workdir = Path(workdir or os.getcwd()).absolute()
    slurm_dir = sweep_dir / "slurm"
    script_path = slurm_dir / "job.sbatch"
    (Path(cfg.log_dir) if cfg.log_dir else slurm_dir / "logs").mkdir(parents=True, exist_ok=True)
    with atomic_path(script_path) as tmp:
        tmp.write_text(sbatch_script(cfg, command, sweep_dir, workdir))
        tmp.chmod(0o755)
    try:
        r = subprocess.run(["sbatch", "--parsable", str(script_path)], check=False, capture_output=True, text=True,
                           cwd=workdir, timeout=60)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: install slurm-wlm or run the sweep locally (refinery sweep CONFIG); "
                         "on a cluster, submit from a node where the Slurm client is configured") from None
    if r.returncode != 0:
        raise SlurmError(f"sbatch rejected {script_path} (exit {r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    job_id = r.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: {r.stdout!r} {r.stderr!r}")
    jobs_path = slurm_dir / "jobs.json"
    jobs = _read_jobs(jobs_path)
    jobs.append({"job_id": job_id, "submitted": time.time(), "script": str(script_path),
                 "command": list(command), "slurm": to_dict(cfg)})
    write_json(jobs_path, jobs)
    return job_id


def _read_jobs(path: Path) -> list[dict]:
    try:
        jobs = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return jobs if isinstance(jobs, list) else []


@dataclass
class JobStatus:
    job_id: str
    state: str
    """PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED, TIMEOUT, REQUEUED, ... or UNKNOWN."""
    reason: str = ""
    exit_code: str = ""
    """`code:signal` as Slurm reports it."""
    restarts: int = 0
    nodes: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    """Everything `scontrol show job` printed (empty when the answer came from sacct)."""


def status(job_id: str) -> JobStatus:
    """A job's state from `scontrol show job` (works without accounting storage), else from sacct.

    slurmctld forgets a finished job after MinJobAge (default 300 s); then only sacct knows it,
    and without accounting storage the state is UNKNOWN.
    """
    try:
        r = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], check=False, capture_output=True,
                           text=True, timeout=30)
    except FileNotFoundError:
        raise SlurmError("scontrol not found: install slurm-wlm (a Slurm client configured for your cluster)") from None
    if r.returncode == 0 and r.stdout.strip():
        f = parse_scontrol(r.stdout.splitlines()[0])
        return JobStatus(job_id=str(job_id), state=f.get("JobState", "UNKNOWN"), reason=f.get("Reason", ""),
                         exit_code=f.get("ExitCode", ""), restarts=int(f.get("Restarts", "0") or 0),
                         nodes=f.get("NodeList", ""), fields=f)
    try:
        s = subprocess.run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State,ExitCode,NodeList"],
                           check=False, capture_output=True, text=True, timeout=30)
        line = s.stdout.strip().splitlines()[0] if s.returncode == 0 and s.stdout.strip() else ""
    except (FileNotFoundError, subprocess.TimeoutExpired):
        line = ""
    if line:
        state, code, nodes = (line.split("|") + ["", ""])[:3]
        return JobStatus(job_id=str(job_id), state=state.split()[0], exit_code=code, nodes=nodes)
    return JobStatus(job_id=str(job_id), state="UNKNOWN", reason=(r.stderr or "").strip())


def parse_scontrol(line: str) -> dict[str, str]:
    """`Key=value Key2=value with spaces ...` (scontrol -o) -> dict; a token without a key continues the value."""
    out: dict[str, str] = {}
    key = None
    for token in line.split(" "):
        m = re.match(r"^([A-Za-z][\w:/]*)=(.*)$", token)
        if m:
            key = m.group(1)
            out[key] = m.group(2)
        elif key is not None and token:
            out[key] += " " + token
    return out
