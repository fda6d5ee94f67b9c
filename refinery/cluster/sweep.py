"""`refinery sweep SWEEP.yaml`: Bayesian search over the pipeline with Ray Tune + Optuna (TPE).

    refinery sweep configs/sweep-quickstart.yaml [--address auto] [dotted=overrides]
    refinery sweep status runs/sweep-quickstart

The driver (one per sweep dir, held by a lock) runs generate once into `<sweep>/shared`, then
Tune: each trial runs distill -> quantize -> evaluate per replicate (refinery.cluster.trial)
and reports the objective measured on the quantized student. Rerunning the same command after
a crash or `kill -9` resumes: `Tuner.restore(resume_errored=True)` keeps finished trials and
the searcher's state, trial processes the dead driver left behind are stopped (they checkpoint
on SIGTERM), and restarted trials continue from their stage manifests and distill checkpoints.
Outputs: `results.csv`, `best.yaml` (runnable), `plots/`, next to `tune/` and `runs/`.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from refinery.cluster.sweep_config import SweepConfig, load_sweep
from refinery.core.config import ConfigError, to_dict
from refinery.core.manifest import write_json
from refinery.core.rayctl import PrivateRay

log = logging.getLogger("refinery.sweep")


@contextmanager
def driver_lock(sweep_dir: Path):
    """One driver per sweep dir; the kernel drops the lock when a driver dies, even by kill -9."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with (sweep_dir / ".driver.lock").open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another `refinery sweep` is running on {sweep_dir}; wait for it or stop it") from None
        yield


def _check_same_sweep(sweep: SweepConfig, sweep_dir: Path) -> None:
    """A sweep dir holds one search space and objective; refuse to resume it with another."""
    spec = sweep_dir / "sweep.json"
    mine = {k: v for k, v in to_dict(sweep).items() if k not in ("max_concurrent", "sweep_dir")}
    if spec.is_file():
        old = json.loads(spec.read_text())
        if old != json.loads(json.dumps(mine)):
            diff = sorted(k for k in set(old) | set(mine) if old.get(k) != json.loads(json.dumps(mine)).get(k))
            raise ConfigError(f"{sweep_dir} holds a sweep with other settings ({', '.join(diff)}): use another "
                              "sweep_dir, or delete it to start over")
    else:
        write_json(spec, mine)


def shared_generate(sweep: SweepConfig, sweep_dir: Path) -> None:
    """The training data of every trial: the base config's generate stage, run once (a complete
    `<sweep>/shared/generate` is reused as it is: the sweep's base and overrides cannot change)."""
    from refinery.core.manifest import read_manifest

    m = read_manifest(sweep_dir / "shared" / "generate")
    if m and m.get("status") == "complete":
        log.info("sweep: reusing the shared data in %s", sweep_dir / "shared" / "generate")
        return
    cmd = [sys.executable, "-m", "refinery.launch.cli", "generate", sweep.base, *sweep.overrides,
           f"run_dir={sweep_dir / 'shared'}"]
    log.info("sweep: shared data: %s", " ".join(cmd))
    if subprocess.run(cmd, check=False).returncode != 0:
        raise RuntimeError(f"sweep: generate for {sweep_dir / 'shared'} failed (see above)")


def _space(sweep: SweepConfig) -> dict:
    from ray import tune

    make = {"loguniform": lambda p: tune.loguniform(p.low, p.high), "uniform": lambda p: tune.uniform(p.low, p.high),
            "int": lambda p: tune.randint(int(p.low), int(p.high) + 1), "choice": lambda p: tune.choice(p.values)}
    return {k: make[p.type](p) for k, p in sweep.space.items()}


def _trainable(config: dict, sweep: SweepConfig, sweep_dir: str, base_seed: int, cwd: str) -> None:
    from ray import tune

    from refinery.cluster.trial import distill_losses, run_trial

    # relative paths in the configs are the driver's: a trial actor on another node (a Ray cluster we
    # did not start) has its raylet's cwd and environment, not the driver's
    os.chdir(cwd)
    progress = None
    if sweep.scheduler == "asha":  # intermediate results for early stopping: mean distill loss per window
        every, sent = sweep.asha.report_every, [0]

        def progress(run_dir: Path) -> None:
            losses = distill_losses(run_dir)
            while len(losses) >= sent[0] + every:
                window = losses[sent[0]:sent[0] + every]
                sent[0] += every
                tune.report({"objective": float("nan"), "neg_distill_loss": -sum(window) / every,
                             "distill_step": sent[0]})

    summary = run_trial(dict(config), sweep, Path(sweep_dir), base_seed, progress)
    final = {k: summary[k] for k in ("objective", "objective_std", "accuracy", "bytes")}
    final |= {"decode_ms": summary["decode_ms"] or 0.0, "key": summary["key"]}
    if sweep.scheduler == "asha":  # the scheduler wants its metric in every result
        from refinery.cluster.trial import run_dirs

        losses = distill_losses(run_dirs(Path(sweep_dir), dict(config), 1)[0])[-sweep.asha.report_every:]
        final |= {"neg_distill_loss": -sum(losses) / max(len(losses), 1), "distill_step": sent[0]}
    tune.report(final)


def _ray_temp(sweep_dir: Path) -> str:
    """A short per-sweep Ray temp dir (Ray's socket paths must stay under ~107 characters)."""
    return f"/tmp/ray-refinery-{hashlib.sha256(str(sweep_dir).encode()).hexdigest()[:8]}"


def stop_ray_orphans(sweep_dir: Path) -> int:
    """Kill Ray processes of this sweep's previous driver (found by its temp dir; nothing else)."""
    import signal

    tag, n = _ray_temp(sweep_dir).encode(), 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if tag in (d / "cmdline").read_bytes():
                    os.kill(int(d.name), signal.SIGKILL)
                    n += 1
            except OSError:
                pass
    return n


def run_sweep(path: str, overrides: list[str] = (), address: str | None = None) -> Path:
    from ray import tune

    from refinery.cluster.results import write_outputs
    from refinery.cluster.trial import stop_orphans
    from refinery.pipeline.config import load

    sweep = load_sweep(path, overrides)
    sweep_dir = Path(sweep.sweep_dir).resolve()
    base = load(sweep.base, sweep.overrides)
    base_seed = base.seed
    # With the Ray launcher a trial's distill runs as a TorchTrainer that reserves its own workers'
    # CPUs/GPUs; the trial process itself then reserves a token 0.01 CPU (Tune refuses 0), or the two
    # would wait on each other. A local Ray gets one logical CPU more to hold those tokens.
    ray_train = base.distill.parallel.launcher == "ray" and base.distill.parallel.strategy != "none"
    resources = {"cpu": 0.01} if ray_train else {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
    with driver_lock(sweep_dir):
        _check_same_sweep(sweep, sweep_dir)
        if stop_orphans(sweep_dir) or (address is None and stop_ray_orphans(sweep_dir)):
            log.info("sweep: stopped processes a previous driver left behind")
        shared_generate(sweep, sweep_dir)
        if not address:
            # Ray workers SIGKILL their children when they exit; a trial's chain must instead get the
            # SIGTERM and checkpoint (it dies with its parent anyway: PDEATHSIG).
            os.environ.setdefault("RAY_kill_child_processes_on_worker_exit", "0")
        # local: a new Ray of our own in the sweep's temp dir (stop_ray_orphans finds leftovers there)
        private = PrivateRay(num_cpus=(os.cpu_count() or 1) + ray_train, temp_dir=_ray_temp(sweep_dir),
                             address=address, join_env=False)
        private.start()
        try:
            trainable = tune.with_resources(
                tune.with_parameters(_trainable, sweep=sweep, sweep_dir=str(sweep_dir), base_seed=base_seed,
                                     cwd=os.getcwd()),
                resources)
            storage = str(sweep_dir / "tune")
            if tune.Tuner.can_restore(os.path.join(storage, "sweep")):
                log.info("sweep: resuming %s", sweep_dir)
                tuner = tune.Tuner.restore(os.path.join(storage, "sweep"), trainable=trainable,
                                           resume_errored=True)
            else:
                tuner = tune.Tuner(trainable, param_space=_space(sweep),
                                   tune_config=_tune_config(sweep, base.distill.steps),
                                   run_config=tune.RunConfig(name="sweep", storage_path=storage,
                                                             failure_config=tune.FailureConfig(max_failures=1)))
            with _graceful_stop() as stopped:
                grid = tuner.fit()
            _record_unfinished(grid, sweep_dir, interrupted=bool(stopped))
        finally:
            private.stop()
        write_outputs(sweep, sweep_dir)
        if stopped:
            from refinery.train.preempt import Preempted

            raise Preempted(-1, stopped[0])
    return sweep_dir


@contextmanager
def _graceful_stop():
    """SIGTERM/SIGUSR1 (Slurm preemption, requeue) -> SIGINT, which Tune handles by stopping the trials
    (their chains get SIGTERM and checkpoint) and saving the experiment for `Tuner.restore`."""
    import signal

    from refinery.train.preempt import on_signals

    got: list[int] = []

    def handle(signum, frame):
        got.append(signum)
        signal.raise_signal(signal.SIGINT)

    with on_signals(handle):
        yield got


def _record_unfinished(grid, sweep_dir: Path, interrupted: bool = False) -> None:
    """`<sweep>/unfinished.json`: configurations stopped early (ASHA), failed, or cut off by a stop of
    the driver (`interrupted`: they resume on rerun), with their last report."""
    from refinery.cluster.trial import config_key

    rows = []
    for r in grid:
        params = {k: v for k, v in (r.config or {}).items()}
        key = config_key(params)
        if (sweep_dir / "results" / f"{key}.json").is_file():
            continue
        m = r.metrics or {}
        rows.append({"key": key, "params": params, "distill_step": m.get("distill_step"),
                     "distill_loss": -m["neg_distill_loss"] if "neg_distill_loss" in m else None,
                     "why": f"failed: {r.error}" if r.error else
                     "stopped early by ASHA, or cut off when the driver stopped (rerun the sweep to resume)" if interrupted else "stopped early by ASHA"})
    write_json(sweep_dir / "unfinished.json", rows)


def _tune_config(sweep: SweepConfig, max_steps: int):
    from ray import tune

    search = None
    if sweep.searcher in ("optuna", "gp"):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        if sweep.searcher == "gp":
            try:
                sampler = optuna.samplers.GPSampler(seed=sweep.seed)
            except ImportError as e:
                raise ConfigError(f"searcher: gp needs {e.name} (pip install scipy), or use searcher: optuna") from e
        else:
            sampler = optuna.samplers.TPESampler(seed=sweep.seed)
        if sweep.objective.metric == "pareto":  # both samplers handle several objectives
            search = OptunaSearch(sampler=sampler, metric=list(sweep.objective.pareto_of),
                                  mode=sweep.objective.modes())
        else:
            search = OptunaSearch(sampler=sampler, metric="objective", mode="max")
    if sweep.scheduler == "asha":  # its own metric (the distill loss); the searcher keeps the objective
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="distill_step", metric="neg_distill_loss", mode="max",
                                  grace_period=sweep.asha.grace_steps, reduction_factor=sweep.asha.reduction_factor,
                                  # past the last report: a trial that survives every rung finishes its chain
                                  max_t=max_steps + 1, stop_last_trials=False)
        return tune.TuneConfig(num_samples=sweep.num_samples, search_alg=search, scheduler=scheduler,
                               max_concurrent_trials=sweep.max_concurrent)
    if search is None:
        return tune.TuneConfig(metric="objective", mode="max", num_samples=sweep.num_samples,
                               max_concurrent_trials=sweep.max_concurrent)
    return tune.TuneConfig(num_samples=sweep.num_samples, search_alg=search, max_concurrent_trials=sweep.max_concurrent)
