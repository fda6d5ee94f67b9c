"""Simulated hosts for the multi-node tests: network namespaces joined by a veth pair, each process in
its own UTS namespace with its own hostname. Addresses exist only inside the namespaces this module
makes; everything it makes is removed by `Hosts.close` (processes by pid, then the namespaces).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

SUBNET = "10.231.7"
"""Only ever assigned inside the namespaces made here (invisible to the host's network)."""


class Hosts:
    """`n` simulated hosts: namespace `names[i]`, interface `IFACE`, address `addr[i]`, hostname node-i."""

    IFACE = "rfn0"

    def __init__(self, n: int = 2):
        assert n == 2, "one veth pair: two hosts"
        tag = uuid.uuid4().hex[:6]
        self.names = [f"rfn-{tag}-{i}" for i in range(n)]
        self.addr = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self.procs: list[subprocess.Popen] = []
        self.temps: list[str] = [f"/tmp/rfn-{tag}-etc"]
        # each host's /etc/hosts names every host, as a cluster's DNS would (bind-mounted on the hosts only)
        os.makedirs(self.temps[0])
        self.etc_hosts = Path(self.temps[0]) / "hosts"
        self.etc_hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} node-{i}\n" for i, a in enumerate(self.addr)))
        made = []
        try:
            for ns in self.names:
                _ip("netns", "add", ns)
                made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            peer = f"rfp-{tag}"
            _ip("link", "add", self.IFACE + tag, "type", "veth", "peer", "name", peer)
            for ns, dev in zip(self.names, [self.IFACE + tag, peer]):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "link", "set", dev, "name", self.IFACE)
            for ns, a in zip(self.names, self.addr):
                _ip("-n", ns, "addr", "add", f"{a}/24", "dev", self.IFACE)
                _ip("-n", ns, "link", "set", self.IFACE, "up")
        except BaseException:
            subprocess.run(["ip", "link", "del", self.IFACE + tag], capture_output=True, check=False)  # if not moved
            for ns in made:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            shutil.rmtree(self.temps[0], ignore_errors=True)
            raise

    def start(self, i: int, cmd: list[str], log: Path, env: dict, private: list[Path] = (),
              cwd: Path | None = None) -> subprocess.Popen:
        """Run `cmd` on host i (its namespace, hostname node-i, /etc/hosts naming every host), output to
        `log`. Each dir in `private` is an empty tmpfs of this host's own (a path the hosts do not share,
        such as a node's /tmp/ray)."""
        mounts = "".join(f"mkdir -p {q} && mount -t tmpfs tmpfs {q} && " for q in map(shlex.quote, map(str, private)))
        # nsenter, not `ip netns exec`: that remounts /sys, and slurmd then finds no /sys/fs/cgroup
        wrapped = ["nsenter", f"--net=/run/netns/{self.names[i]}", "unshare", "--uts", "--mount", "sh", "-c",
                   f'hostname node-{i} && mount --bind {self.etc_hosts} /etc/hosts && {mounts}exec "$@"', "sh", *cmd]
        with log.open("w") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(wrapped, stdout=out, stderr=subprocess.STDOUT, env=env, text=True,
                                    start_new_session=True, cwd=cwd)
        self.procs.append(proc)
        return proc

    def pids(self, i: int) -> list[int]:
        """Every process living on host i (in its network namespace)."""
        out = subprocess.run(["ip", "netns", "pids", self.names[i]], capture_output=True, text=True, check=False)
        return [int(p) for p in out.stdout.split()]

    def kill(self, i: int) -> int:
        """Host i dies: SIGKILL to every process on it (Ray's raylet and workers, trial chains, ...)."""
        pids = self.pids(i)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def start_ray(self, tmp: Path, cpus: int = 1) -> dict[str, str]:
        """A Ray cluster over the hosts (`ray start --block`): the head on host 0 (GCS port 6379 inside its
        namespace), a worker on each other host, `cpus` CPUs each, token auth, Ray's files in short temp
        dirs of their own. Returns the environment a driver needs (RAY_ADDRESS, the token) once every
        node has started; raises with the logs if one does not within 120 s."""
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN": uuid.uuid4().hex,
               # a trial's chain must get SIGTERM (and checkpoint), not SIGKILL, when its worker exits
               "RAY_kill_child_processes_on_worker_exit": "0",
               # a dead node is noticed in ~3 s instead of ~15 s
               "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        address = f"{self.addr[0]}:6379"
        ray = str(Path(sys.executable).parent / "ray")
        logs = []
        for i in range(len(self.names)):
            temp = f"/tmp/{self.names[i]}"
            self.temps.append(temp)
            role = ["--head", "--port", "6379", "--include-dashboard=false"] if i == 0 else ["--address", address]
            cmd = [ray, "start", "--block", *role, "--node-ip-address", self.addr[i], "--num-cpus", str(cpus),
                   "--disable-usage-stats", "--temp-dir", temp]
            logs.append(tmp / f"ray-node-{i}.log")
            proc = self.start(i, cmd, logs[-1], env)
            _wait_for(proc, logs[-1], "Ray runtime started", 120, logs)
        return {**{k: v for k, v in env.items() if k.startswith("RAY_")}, "RAY_ADDRESS": address}

    def close(self) -> None:
        try:
            for i in range(len(self.names)):  # every process on the hosts, also those Ray started
                self.kill(i)
            for proc in self.procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, 9)
                    except ProcessLookupError:
                        pass
                proc.wait(timeout=30)
        finally:
            for ns in self.names:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            for temp in self.temps:
                shutil.rmtree(temp, ignore_errors=True)


def _wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float, logs: list[Path]) -> None:
    """Until `text` is in `log`; raises with the logs when `proc` exits first or the time is up."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    if text in log.read_text(errors="replace"):
        return
    tails = "\n".join(f"== {p}\n{p.read_text(errors='replace')[-2000:]}" for p in logs if p.is_file())
    raise RuntimeError(f"no {text!r} in {log} (exit code {proc.poll()}, {timeout} s at most):\n{tails}")


def unavailable() -> str:
    """Why simulated hosts cannot be made here ('' when they can)."""
    if os.geteuid() != 0 or not all(shutil.which(b) for b in ("ip", "unshare", "nsenter")):
        return "needs root, iproute2, unshare and nsenter to make network/UTS/mount namespaces"
    try:
        Hosts(2).close()
    except subprocess.CalledProcessError as e:
        return f"cannot make network namespaces here: {(e.stderr or b'').decode().strip() or e}"
    return ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)
