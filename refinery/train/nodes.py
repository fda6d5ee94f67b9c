"""`distill` across nodes: torchrun's c10d rendezvous, hosted by node 0.

    node 0:   refinery distill CONFIG --nnodes 2 --nproc 2            # runs the stage, as on one node
    node 1:   refinery distill CONFIG --nnodes 2 --nproc 2 --node-rank 1   # only joins node 0's job

Same config on every node. run_dir must be on a filesystem that every node sees at the same path:
node 0 writes the launch spec there, rank 0 the metrics and adapter, every rank its checkpoint
shard. Under Slurm the node rank (SLURM_NODEID) and the endpoint (first host of the allocation)
come from the job, so one `srun` line starts every node.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from refinery.core.config import UserError

log = logging.getLogger("refinery.train")
PORT = 29400
"""torchrun's own default rendezvous port."""


def node_rank(parallel) -> int:
    """This node's index: the config, else SLURM_NODEID, else NODE_RANK; 0 on one node."""
    if parallel.nnodes == 1:
        return 0
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
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodes:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return f"{hosts.stdout.split()[0]}:{PORT}"
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


def torchrun(parallel, spec: Path) -> tuple[list[str], dict[str, str]]:
    """The torchrun arguments (after `python -m torch.distributed.run`) and extra environment for this node."""
    nproc = ["--nproc_per_node", str(parallel.nproc), "--max-restarts", "0"]
    if parallel.nnodes == 1:
        return ["--standalone", *nproc], {}
    env, rank = interface_env(parallel), node_rank(parallel)
    args = ["--nnodes", str(parallel.nnodes), *nproc, "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint(parallel),
            "--rdzv_id", hashlib.sha1(str(spec).encode()).hexdigest()[:12],
            "--rdzv_conf", f"join_timeout={parallel.timeout_s},read_timeout={parallel.timeout_s},"
                           f"is_host={int(rank == 0)}"]
    if parallel.interface:  # workers reach each other by this address, not by a hostname
        args += ["--local_addr", interface_addr(parallel.interface)]
    return args, env


def mark(out: Path, rank: int) -> None:
    """Leave `out/nodes/node-R.json` (host, time) so that node 0 can name a node that never came."""
    from refinery.core.manifest import write_json

    write_json(out / "nodes" / f"node-{rank}.json", {"host": socket.gethostname(), "time": time.time()})


def missing(out: Path, nnodes: int, since: float, window: float) -> list[int]:
    """Nodes 1..N-1 with no marker written within `window` s before `since` (or after it)."""
    gone = []
    for r in range(1, nnodes):
        p = out / "nodes" / f"node-{r}.json"
        try:
            ok = json.loads(p.read_text())["time"] >= since - window
        except (OSError, ValueError, KeyError):
            ok = False
        if not ok:
            gone.append(r)
    return gone


def agent(parallel, spec: Path, what: str) -> tuple[int, int | None]:
    """Run this node's torchrun agent on `refinery.train.worker SPEC`; a SIGTERM/SIGUSR1 to this process
    is passed on as SIGTERM (torchrun hands it to the workers, which checkpoint and stop).
    Returns (exit code, the signal received or None)."""
    import signal
    import sys

    from refinery.core.proc import pythonpath
    from refinery.train.preempt import on_signals

    args, extra = torchrun(parallel, spec)
    env = {**os.environ, **extra, "PYTHONPATH": pythonpath()}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel.nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, "-m", "refinery.train.worker", str(spec)]
    log.info("%s: %s", what, " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        proc.send_signal(signal.SIGTERM)

    with on_signals(forward):
        code = proc.wait()
    return code, (got[0] if got else None)


def join(cfg) -> int:
    """A node other than 0: run torchrun's agent for node 0's distill job and wait for it to end."""
    import sys

    parallel, out = cfg.distill.parallel, Path(cfg.run_dir) / "distill"
    rank = node_rank(parallel)
    mark(out, rank)
    code, signum = agent(parallel, out / "launch.json",
                         f"distill: node {rank} of {parallel.nnodes} joins {endpoint(parallel)}")
    if signum:
        return 128 + signum
    if code:
        print(f"refinery: distill node {rank}: its torchrun agent failed (exit code {code}); see the log above and "
              "node 0's", file=sys.stderr)
    return 1 if code else 0
