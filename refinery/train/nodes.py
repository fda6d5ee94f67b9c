"""`distill` across nodes: torchrun's c10d rendezvous, hosted by node 0.

    node 0:   refinery distill CONFIG --nnodes 2 --nproc 2 --node-rank 0   # runs the stage, as on one node
    node 1:   refinery distill CONFIG --nnodes 2 --nproc 2 --node-rank 1   # only joins node 0's job

Same config on every node. run_dir must be on a filesystem that every node sees at the same path.
Node 0 announces each attempt in `<run_dir>/distill.nodes/job.json` (the launch spec's path, which
is `distill.new/` on a staged re-run, and the attempt id that names the rendezvous); the other nodes
wait for that announcement (up to `distill.parallel.timeout_s`), then join, and leave a marker there
so that node 0 can name a node that never came. Global rank 0 (which writes metrics and the adapter)
is whichever rank the rendezvous orders first, not necessarily on node 0. Under Slurm the node rank
(SLURM_NODEID) and the endpoint (first host of the step) come from the job, so one `srun` line
starts every node.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from refinery.core.config import UserError

log = logging.getLogger("refinery.train")
PORT = 29400
"""torchrun's own default rendezvous port."""


def node_rank(parallel) -> int:
    """This node's index: the config, else SLURM_NODEID, else NODE_RANK; 0 on one node."""
    if parallel.nnodes == 1:
        return 0
    if os.environ.get("SLURM_LOCALID", "0") != "0":
        raise UserError("distill across nodes under Slurm takes one task per node (srun --ntasks-per-node 1); "
                        "--nproc sets the processes on each node")
    if parallel.node_rank >= 0:
        return parallel.node_rank
    for var in ("SLURM_NODEID", "NODE_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    raise UserError(f"distill.parallel.nnodes={parallel.nnodes} but this node's rank is unknown: pass --node-rank R "
                    "(0 on the node that runs the stage, 1..N-1 on the others), or run under Slurm (SLURM_NODEID)")


def endpoint(parallel) -> str:
    """HOST:PORT of the rendezvous: the config, else Slurm's first host, else MASTER_ADDR[:MASTER_PORT]."""
    if parallel.rdzv_endpoint:
        return parallel.rdzv_endpoint if ":" in parallel.rdzv_endpoint else f"{parallel.rdzv_endpoint}:{PORT}"
    nodes = next((os.environ[v] for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                  if os.environ.get(v)), "")
    if nodes:
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   check=True, timeout=60).stdout.split()
        except (OSError, subprocess.SubprocessError) as e:
            raise UserError(f"cannot expand the Slurm node list {nodes!r} with `scontrol show hostnames` ({e}): "
                            "set distill.parallel.rdzv_endpoint=HOST:PORT (node 0's address)") from e
        return f"{hosts[0]}:{PORT}"
    if os.environ.get("MASTER_ADDR"):
        return f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', PORT)}"
    raise UserError("distill.parallel.nnodes > 1 needs the rendezvous address: set distill.parallel.rdzv_endpoint="
                    "HOST:PORT (node 0's address, reachable from every node), or MASTER_ADDR, or run under Slurm")


def interface_addr(name: str) -> str:
    """The IPv4 address of network interface `name` (SIOCGIFADDR)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError as e:
            have = ", ".join(n for _, n in socket.if_nameindex())
            raise UserError(f"distill.parallel.interface={name!r}: no IPv4 address on it ({e.strerror}); "
                            f"interfaces here: {have}") from e
    return socket.inet_ntoa(packed[20:24])


def interface_env(parallel) -> dict[str, str]:
    """The variables that make gloo and NCCL use `distill.parallel.interface` (none when it is unset)."""
    return {"GLOO_SOCKET_IFNAME": parallel.interface, "NCCL_SOCKET_IFNAME": parallel.interface} \
        if parallel.interface else {}


def torchrun(parallel, rdzv_id: str = "") -> tuple[list[str], dict[str, str]]:
    """The torchrun arguments (after `python -m torch.distributed.run`) and extra environment for this node."""
    nproc = ["--nproc_per_node", str(parallel.nproc), "--max-restarts", "0"]
    if parallel.nnodes == 1:
        return ["--standalone", *nproc], {}
    env, rank = interface_env(parallel), node_rank(parallel)
    args = ["--nnodes", str(parallel.nnodes), *nproc, "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint(parallel),
            "--rdzv_id", rdzv_id,
            "--rdzv_conf", f"join_timeout={parallel.timeout_s},read_timeout={parallel.timeout_s},"
                           f"is_host={int(rank == 0)}"]
    if parallel.interface:  # workers reach each other by this address, not by a hostname
        args += ["--local_addr", interface_addr(parallel.interface)]
    return args, env


def job_dir(run_dir: Path) -> Path:
    """Where node 0 announces its attempts and the other nodes leave their markers (outside the staged
    stage dir, so every node finds it whichever dir the attempt writes to)."""
    return Path(run_dir) / "distill.nodes"


def announce(run_dir: Path, **fields) -> None:
    from refinery.core.manifest import write_json

    write_json(job_dir(run_dir) / "job.json", {**fields, "host": socket.gethostname(), "time": time.time()})


def read_job(run_dir: Path) -> dict:
    try:
        return json.loads((job_dir(run_dir) / "job.json").read_text())
    except (OSError, ValueError):
        return {}


def new_attempt(run_dir: Path, spec: Path) -> str:
    """Node 0, before starting torchrun: a new attempt id (the rendezvous id), announced with the spec."""
    attempt = uuid.uuid4().hex[:12]
    announce(run_dir, status="launching", attempt=attempt, spec=str(spec.resolve()))
    return attempt


def absent(run_dir: Path, nnodes: int, attempt: str) -> list[int]:
    """Nodes 1..N-1 that left no marker for this attempt."""
    gone = []
    for r in range(1, nnodes):
        try:
            ok = json.loads((job_dir(run_dir) / f"node-{r}.json").read_text()).get("attempt") == attempt
        except (OSError, ValueError):
            ok = False
        if not ok:
            gone.append(r)
    return gone


def agent(parallel, spec: Path, what: str, rdzv_id: str = "") -> tuple[int, int | None]:
    """Run this node's torchrun agent on `refinery.train.worker SPEC`; a SIGTERM/SIGUSR1 to this process
    is passed on as SIGTERM (torchrun hands it to the workers, which checkpoint and stop).
    Returns (exit code, the signal received or None)."""
    from refinery.core.proc import pythonpath
    from refinery.train.preempt import on_signals

    args, extra = torchrun(parallel, rdzv_id)
    env = {**os.environ, **extra, "PYTHONPATH": pythonpath()}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel.nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, "-m", "refinery.train.worker", str(spec)]
    log.info("%s: %s", what, " ".join(cmd))
    got: list[int] = []
    proc: list[subprocess.Popen] = []

    def forward(signum, frame):
        got.append(signum)
        if proc:
            proc[0].send_signal(signal.SIGTERM)

    with on_signals(forward):  # before Popen: a signal in between still reaches torchrun
        proc.append(subprocess.Popen(cmd, env=env))
        if got:
            proc[0].send_signal(signal.SIGTERM)
        code = proc[0].wait()
    return code, (got[0] if got else None)


def join(cfg, since: float | None = None) -> int:
    """A node other than 0: wait for node 0's announcement, run torchrun's agent for that attempt,
    and wait for it to end. `since`: when this command started (time.time())."""
    from refinery.core.manifest import write_json

    parallel, run_dir = cfg.distill.parallel, Path(cfg.run_dir)
    # an end announced after this command began is this run's (node 0 announces only after its own
    # start-up and checks); one from before is a past run's, e.g. of the same command a moment ago
    rank, started = node_rank(parallel), since or time.time()
    deadline = time.time() + parallel.timeout_s
    log.info("distill: node %d of %d waits for node 0's job in %s", rank, parallel.nnodes, job_dir(run_dir))
    while True:
        job = read_job(run_dir)
        if job.get("status") == "launching" and Path(job.get("spec", "")).is_file():
            break
        if job.get("status") in ("done", "failed", "skipped") and job["time"] >= started:  # not a past run's
            print(f"refinery: distill node {rank}: node 0 ({job.get('host')}) reports distill {job['status']}: "
                  "nothing to join", file=sys.stderr)
            return 1 if job["status"] == "failed" else 0
        if time.time() > deadline:
            last = f" (the last one: {job['status']} at {time.strftime('%H:%M:%S', time.localtime(job['time']))}, " \
                   "before this node started)" if job.get("status") else ""
            raise UserError(f"distill node {rank}: node 0 announced no distill job in {job_dir(run_dir) / 'job.json'} "
                            f"within {parallel.timeout_s} s{last}: start node 0 (`refinery distill CONFIG --nnodes "
                            f"{parallel.nnodes} --node-rank 0`), and check that run_dir is the path every node "
                            "shares (under `refinery run`, node 0 reaches distill after the earlier stages: "
                            "raise distill.parallel.timeout_s or run those first)")
        time.sleep(0.5)
    write_json(job_dir(run_dir) / f"node-{rank}.json", {"host": socket.gethostname(), "attempt": job["attempt"]})
    code, signum = agent(parallel, Path(job["spec"]), f"distill: node {rank} of {parallel.nnodes} joins "
                         f"{endpoint(parallel)} (attempt {job['attempt']})", job["attempt"])
    if signum:
        return 128 + signum
    if code:
        print(f"refinery: distill node {rank}: its torchrun agent failed (exit code {code}); see the log above and "
              "node 0's", file=sys.stderr)
    return 1 if code else 0
