"""A real one-node Slurm cluster on localhost, for tests (needs root and Debian's slurm-wlm + munge).

    cluster = start(Path(tempfile.mkdtemp()))   # munged if not running, slurmctld, slurmd; node idle
    ...                                          # sbatch/scontrol/squeue see it through $SLURM_CONF
    cluster.stop()                               # only what start() started, by the pids it recorded

Install the daemons with `scripts/install-slurm.sh`. Every path the daemons write (state, spool,
logs, pid files) is under the temp dir, and the ports are free ones picked at start, so the
cluster leaves nothing behind and does not collide with a system Slurm (default ports 6817/6818).
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel", "munge", "unmunge")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")


def missing() -> str | None:
    """Why a real cluster cannot start here (None when it can)."""
    absent = [b for b in DAEMONS + CLIENTS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if absent:
        return f"Slurm/munge not installed (missing {', '.join(absent)}): run scripts/install-slurm.sh as root"
    if os.geteuid() != 0:
        return "the one-node test Slurm runs its daemons as root (SlurmUser=root): run the tests as root"
    return None


@dataclass
class Cluster:
    root: Path
    conf: Path
    node: str
    cpus: int
    partition: str = "debug"
    pids: dict[str, int] = field(default_factory=dict)
    """Daemons this cluster started: name -> pid (munged only when it was not already running)."""

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout)

    def log(self, name: str = "slurmctld") -> str:
        p = self.root / "log" / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        """Cancel this cluster's jobs, stop the daemons start() started, delete the temp dir."""
        if "slurmctld" in self.pids:
            self.run("scancel", "--full", "--partition", self.partition, check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        # every slurmd first (one per node), then slurmctld, then munged
        for name in sorted(self.pids, key=lambda n: ("slurmd" not in n, n == "munged")):
            _terminate(self.pids.pop(name))
        shutil.rmtree(self.root, ignore_errors=True)


def start(root: Path, timeout: float = 60) -> Cluster:
    """Start munged (if needed), slurmctld and slurmd with a slurm.conf in `root`; wait for an idle node."""
    root = Path(root)
    node = socket.gethostname().split(".")[0]
    cluster = Cluster(root=root, conf=root / "slurm.conf", node=node, cpus=os.cpu_count() or 1)
    try:
        munged = _ensure_munged(timeout)
        if munged:
            cluster.pids["munged"] = munged
        _write_conf(cluster)
        cluster.pids["slurmctld"] = _daemon(cluster, "slurmctld", "-c", "-i", "-f", str(cluster.conf))
        cluster.pids["slurmd"] = _daemon(cluster, "slurmd", "-c", "-f", str(cluster.conf))
        _wait_idle(cluster, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _write_conf(c: Cluster) -> None:
    for d in ("state", "spool", "log"):
        (c.root / d).mkdir(parents=True, exist_ok=True)
    ctld_port, slurmd_port = _free_port(), _free_port()
    c.conf.write_text(f"""\
# One-node test cluster written by tests/cluster/slurm_fixture.py
ClusterName=refinerytest
SlurmctldHost={c.node}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# linuxproc/none: no cgroups needed (containers, no systemd)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
StateSaveLocation={c.root}/state
SlurmdSpoolDir={c.root}/spool
SlurmctldPidFile={c.root}/slurmctld.pid
SlurmdPidFile={c.root}/slurmd.pid
SlurmctldLogFile={c.root}/log/slurmctld.log
SlurmdLogFile={c.root}/log/slurmd.log
# KillWait: Slurm's default grace between SIGTERM and SIGKILL; frequent scheduling for quick tests
KillWait=30
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName={c.node} CPUs={c.cpus} State=UNKNOWN
PartitionName={c.partition} Nodes={c.node} Default=YES MaxTime=INFINITE State=UP
""")


def _daemon(c: Cluster, name: str, *args: str) -> int:
    """Run a daemon that forks into the background; return the pid from its pid file."""
    pid_file = c.root / f"{name}.pid"
    r = subprocess.run([name, *args], check=False, env=c.env, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed to start ({r.returncode}): {r.stderr}\n{c.log(name)[-2000:]}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            return int(pid_file.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            time.sleep(0.1)
    raise RuntimeError(f"{name} wrote no pid file {pid_file}:\n{c.log(name)[-2000:]}")


def _wait_idle(c: Cluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        r = c.run("sinfo", "-h", "-N", "-n", c.node, "-o", "%t", check=False)
        state = r.stdout.strip() or r.stderr.strip()
        if state == "idle":
            return
        time.sleep(0.5)
    raise RuntimeError(f"node {c.node} not idle after {timeout:.0f} s (sinfo: {state!r});\n"
                       f"slurmctld log:\n{c.log()[-2000:]}\nslurmd log:\n{c.log('slurmd')[-2000:]}")


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], check=False, capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        back = subprocess.run(["unmunge"], check=False, input=cred.stdout, capture_output=True, timeout=10)
        return back.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _ensure_munged(timeout: float) -> int | None:
    """Start munged as user munge unless one already answers; return its pid when started here."""
    if _munge_works():
        return None
    munge = pwd.getpwnam("munge")
    if not MUNGE_KEY.exists():  # the Debian package creates one; make it if someone removed it
        MUNGE_KEY.parent.mkdir(mode=0o700, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
        os.chmod(MUNGE_KEY, 0o400)
        os.chown(MUNGE_KEY.parent, munge.pw_uid, munge.pw_gid)
        os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
    for d in (MUNGE_RUN, Path("/var/log/munge"), Path("/var/lib/munge")):
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
    pid_file = MUNGE_RUN / "munged.pid"
    r = subprocess.run(["runuser", "-u", "munge", "--", _which("munged"), "--force"],
                       check=False, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"munged failed to start ({r.returncode}): {r.stderr}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _munge_works() and pid_file.exists():
            return int(pid_file.read_text().split()[0])
        time.sleep(0.2)
    raise RuntimeError("munged started but munge -n | unmunge does not work")


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _terminate(pid: int, wait: float = 20) -> None:
    """SIGTERM `pid`, SIGKILL it if still alive after `wait` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone for our purpose
    except (FileNotFoundError, IndexError):
        return False


@dataclass
class HostsCluster(Cluster):
    """A Slurm cluster over simulated hosts (tests/hosts.py): slurmctld and one slurmd on host 0, one slurmd
    on each other host, each node with its own hostname and address. Client commands run on host 0."""

    hosts: object = None

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.hosts.names[0], *args], env=self.env, capture_output=True,
                              text=True, check=check, timeout=timeout)


def start_on_hosts(root: Path, hosts, cpus: int = 1, timeout: float = 60) -> HostsCluster:
    """slurmctld on host 0 and a slurmd named node-i on each host i (`cpus` CPUs each), in the foreground
    under the hosts' process tracking; every node's /tmp/ray is its own, as on real nodes. Waits until
    every node is idle."""
    root = Path(root)
    names = [f"node-{i}" for i in range(len(hosts.names))]
    c = HostsCluster(root=root, conf=root / "slurm.conf", node=names[0], cpus=cpus, hosts=hosts)
    try:
        munged = _ensure_munged(timeout)
        if munged:
            c.pids["munged"] = munged
        _write_conf(c)  # then the parts that differ from one node on localhost
        text = c.conf.read_text().split("NodeName=")[0]
        text = re.sub(r"SlurmctldHost=.*", f"SlurmctldHost={names[0]}({hosts.addr[0]})", text)
        text = re.sub(r"SlurmctldPort=.*", "SlurmctldPort=6817", re.sub(r"SlurmdPort=.*", "SlurmdPort=6818", text))
        for key in ("SlurmdSpoolDir", "SlurmdPidFile", "SlurmdLogFile"):  # one per node: %n is the node name
            text = re.sub(rf"{key}=(\S+?)(\.\w+)?$", lambda m: f"{key}={m.group(1)}-%n{m.group(2) or ''}", text,
                          flags=re.M)
        text += "".join(f"NodeName={n} NodeAddr={a} CPUs={cpus} State=UNKNOWN\n" for n, a in zip(names, hosts.addr))
        text += f"PartitionName={c.partition} Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP\n"
        c.conf.write_text(text)
        for n in names:
            (root / f"spool-{n}").mkdir()
        env = c.env
        logs = root / "log"
        c.pids["slurmctld"] = hosts.start(0, ["slurmctld", "-D", "-c", "-i", "-f", str(c.conf)],
                                          logs / "slurmctld.out", env).pid
        for i, n in enumerate(names):
            c.pids[f"slurmd-{n}"] = hosts.start(i, ["slurmd", "-D", "-c", "-N", n, "-f", str(c.conf)],
                                                logs / f"slurmd-{n}.out", env, private=[Path("/tmp/ray")]).pid
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            states = c.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            if sorted(states.split()) == sorted([*names, *["idle"] * len(names)]):
                return c
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout:.0f} s (sinfo: {states!r});\n"
                           f"slurmctld log:\n{c.log()[-2000:]}\n" +
                           "".join(f"{p}:\n{p.read_text(errors='replace')[-1500:]}\n" for p in logs.glob("*")))
    except BaseException:
        c.stop()
        raise
