"""One sweep trial: the chain distill -> quantize -> evaluate for one configuration, per replicate.

Each replicate is a `refinery run ... --stages distill,quantize,evaluate` process in its own run
directory, named by a hash of the configuration and the replicate's seed, so a trial restarted
after a crash or preemption finds its finished stages (manifests) and its distill checkpoints
and continues; generate is shared by the whole sweep (a symlink to `<sweep>/shared/generate`).
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from refinery.core.config import config_hash
from refinery.core.manifest import read_jsonl_prefix, write_json
from refinery.core.proc import pythonpath

LOCK = ".trial.pid"
STAGES = "distill,quantize,evaluate"


class TrialFailed(RuntimeError):
    pass


def config_key(params: dict) -> str:
    return config_hash(params)[:12]


def overrides(sweep, params: dict) -> list[str]:
    """The dotted overrides of one configuration (sweep-wide ones first)."""
    return [*sweep.overrides, *[f"{k}={json.dumps(v)}" for k, v in sorted(params.items())]]


def run_dirs(sweep_dir: Path, params: dict, replicates: int) -> list[Path]:
    return [sweep_dir / "runs" / f"{config_key(params)}-r{k}" for k in range(replicates)]


def _read_objective(run_dir: Path, objective) -> dict:
    res = json.loads((run_dir / "evaluate" / "results.json").read_text())
    m = res["models"].get(objective.model)
    if m is None or "mean_acc" not in m:
        raise TrialFailed(f"{run_dir}: evaluate has no accuracy for {objective.model}; keep it in evaluate.models")
    decode = (m.get("latency") or {}).get("decode_ms_per_token")
    score = m["mean_acc"]
    if objective.metric == "pareto" and "decode_ms" in objective.pareto_of and decode is None:
        raise TrialFailed(f"{run_dir}: objective.pareto_of has decode_ms but evaluate measured no latency; "
                          "set evaluate.latency.enabled=true in the sweep's overrides")
    if objective.metric == "weighted":
        score -= objective.bytes_weight * m["bytes"] / 1e9 + objective.latency_weight * (decode or 0.0)
    return {"objective": score, "accuracy": m["mean_acc"], "bytes": m["bytes"], "decode_ms": decode,
            "per_task": {t: v["acc"] for t, v in m["tasks"].items()}}


def _ray_address() -> dict:
    try:
        import ray

        return {"RAY_ADDRESS": ray.get_runtime_context().gcs_address} if ray.is_initialized() else {}
    except Exception:  # not inside Ray (direct calls, tests)
        return {}


def _die_with_parent() -> None:
    """In the child: get SIGTERM (and so checkpoint) if the trial process that started us dies."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def distill_losses(run_dir: Path) -> list[float]:
    """Losses of the distill steps done so far (a torn last line from a live writer is skipped)."""
    return [r["loss"] for r in read_jsonl_prefix(run_dir / "distill" / "metrics.jsonl")]


def run_replicate(sweep, sweep_dir: Path, params: dict, k: int, base_seed: int, on_progress=None) -> dict:
    """One replicate's chain; `on_progress(run_dir)` is called every few seconds while it runs."""
    run_dir = run_dirs(sweep_dir, params, k + 1)[k]
    run_dir.mkdir(parents=True, exist_ok=True)
    gen = run_dir / "generate"
    if not gen.exists():
        gen.symlink_to(sweep_dir / "shared" / "generate", target_is_directory=True)
    cmd = [sys.executable, "-m", "refinery.launch.cli", "run", sweep.base, *overrides(sweep, params),
           f"run_dir={run_dir}", f"seed={base_seed + k}", "--stages", STAGES,
           "--reuse", "generate"]  # one shared generate (made at the base seed) for every replicate
    env = {**os.environ, "PYTHONPATH": pythonpath()}
    env.update(_ray_address())  # distill.parallel.launcher=ray: the TorchTrainer joins the sweep's cluster
    t0 = time.time()
    with (run_dir / "trial.log").open("a") as log:
        host = socket.gethostname()  # where this attempt runs: a retried trial may move to another node
        log.write(f"[trial] {time.strftime('%H:%M:%S')} chain of {run_dir.name} starts on host {host}\n")
        log.flush()
        # own process group: a raylet shutting down SIGKILLs its workers' groups at once (seen under
        # Slurm's requeue), which would kill the chain before it checkpoints; it still gets SIGTERM
        # from Slurm, from the trial (below) and when the trial process dies (PDEATHSIG)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                preexec_fn=_die_with_parent, process_group=0)
        (run_dir / LOCK).write_text(str(proc.pid))
        try:
            while True:
                try:
                    code = proc.wait(timeout=2)
                    break
                except subprocess.TimeoutExpired:
                    if on_progress:
                        on_progress(run_dir)
        except BaseException:  # Tune stopping the trial: let the chain checkpoint, then go
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
            raise
        finally:
            (run_dir / LOCK).unlink(missing_ok=True)
    if code != 0:
        tail = (run_dir / "trial.log").read_text()[-2000:]
        raise TrialFailed(f"trial run {run_dir} failed (exit {code}):\n{tail}")
    return {**_read_objective(run_dir, sweep.objective), "wall_s": round(time.time() - t0, 1), "host": host}


def run_trial(params: dict, sweep, sweep_dir: Path, base_seed: int, on_progress=None) -> dict:
    """All replicates of one configuration; writes `<sweep>/results/<key>.json`; returns the summary.

    A configuration already summarized is returned as it is: Tune may run a trial again after a
    driver crash when its experiment state was saved before the trial finished, and a searcher may
    propose a configuration twice (choice-only spaces). Two trials of one configuration at once
    would share its run dirs: the second waits on the first's lock (`<sweep>/locks/<key>.lock`, flock:
    shared file systems must support it) and then returns its summary.
    """
    done = sweep_dir / "results" / f"{config_key(params)}.json"
    if done.is_file():
        return json.loads(done.read_text())
    (sweep_dir / "locks").mkdir(parents=True, exist_ok=True)
    with (sweep_dir / "locks" / f"{config_key(params)}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        if done.is_file():
            return json.loads(done.read_text())
        return _run_replicates(params, sweep, sweep_dir, base_seed, on_progress)


def _run_replicates(params: dict, sweep, sweep_dir: Path, base_seed: int, on_progress) -> dict:
    done = sweep_dir / "results" / f"{config_key(params)}.json"
    reps = [run_replicate(sweep, sweep_dir, params, k, base_seed, on_progress if k == 0 else None)
            for k in range(sweep.replicates)]
    scores = [r["objective"] for r in reps]
    summary = {"key": config_key(params), "params": params, "objective": statistics.mean(scores),
               "objective_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
               "accuracy": statistics.mean(r["accuracy"] for r in reps),
               "bytes": statistics.mean(r["bytes"] for r in reps),
               "decode_ms": statistics.mean(r["decode_ms"] for r in reps) if all(r["decode_ms"] for r in reps)
               else None, "replicates": reps, "finished": time.time()}
    write_json(done, summary)
    return summary


def stop_orphans(sweep_dir: Path, grace_s: float = 60.0) -> list[int]:
    """Stop trial processes left by a driver that died (only ours: pids recorded in our run dirs)."""
    stopped = []
    for lock in sorted((sweep_dir / "runs").glob(f"*/{LOCK}")):
        try:
            pid = int(lock.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (ValueError, OSError):
            lock.unlink(missing_ok=True)
            continue
        if str(lock.parent).encode() not in cmdline:  # pid reused by something else
            lock.unlink(missing_ok=True)
            continue
        os.kill(pid, signal.SIGTERM)  # the chain checkpoints on SIGTERM
        deadline = time.time() + grace_s
        while Path(f"/proc/{pid}").exists() and time.time() < deadline:
            time.sleep(0.2)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
        lock.unlink(missing_ok=True)
        stopped.append(pid)
    return stopped
