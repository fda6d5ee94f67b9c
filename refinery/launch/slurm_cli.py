"""`refinery cluster slurm SWEEP_CONFIG [overrides] [options]`: its options and what it runs (the batch
script, submission and job status: refinery/cluster/slurm.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from refinery.cluster.slurm import SlurmConfig, SlurmError, sbatch_script, submit
from refinery.cluster.sweep_config import load_sweep
from refinery.core.config import ConfigError, build


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SlurmConfig()
    p.add_argument("sweep_config", help="the sweep's YAML (its sweep_dir gets slurm/job.sbatch, jobs.json, logs)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the sweep config, passed on to `refinery sweep`")
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task, help="CPUs per node (all for Ray)")
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    p.add_argument("--time", default=d.time, help="time limit, e.g. 12:00:00 or 2-00:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--job-name", default=d.job_name)
    p.add_argument("--no-requeue", action="store_true", help="do not requeue on preemption or time limit")
    p.add_argument("--signal-lead", type=int, default=d.signal_lead_s,
                   help="seconds before the time limit to checkpoint and requeue (0 = off)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra sbatch option, repeatable (e.g. --sbatch=--account=abc)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="bash line to run before Ray starts, repeatable (e.g. 'module load cuda')")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--no-ray", action="store_true", help="run the driver without starting Ray")
    p.add_argument("--ray-port", type=int, default=d.ray_port)
    p.add_argument("--ray-head-arg", action="append", default=[], metavar="OPTION",
                   help="extra `ray start --head` option, repeatable (e.g. --ray-head-arg=--temp-dir=/scratch/ray)")
    p.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")


def run(args) -> int:
    """`refinery cluster slurm SWEEP_CONFIG [overrides] [options]`: submit the sweep driver; print the job id."""
    overrides = args.overrides
    config = Path(args.sweep_config).absolute()
    try:
        cfg = build(SlurmConfig, {
            "nodes": args.nodes, "cpus_per_task": args.cpus_per_task, "gpus_per_node": args.gpus_per_node,
            "time": args.time, "partition": args.partition, "job_name": args.job_name,
            "requeue": not args.no_requeue, "signal_lead_s": args.signal_lead, "extra_sbatch": args.sbatch,
            "setup": args.setup, "log_dir": args.log_dir, "start_ray": not args.no_ray, "ray_port": args.ray_port,
            "ray_head_args": args.ray_head_arg})
        sweep_dir = Path(load_sweep(str(config), overrides).sweep_dir).absolute()  # fail now, not in the queue
    except ConfigError as e:
        print(f"refinery cluster slurm: {e}", file=sys.stderr)
        return 2
    command = ["refinery", "sweep", str(config), *overrides, "--address", "auto"]
    if args.dry_run:
        print(sbatch_script(cfg, command, sweep_dir), end="")
        return 0
    try:
        job_id = submit(cfg, command, sweep_dir)
    except SlurmError as e:
        print(f"refinery cluster slurm: {e}", file=sys.stderr)
        return 1
    log_dir = Path(cfg.log_dir) if cfg.log_dir else sweep_dir / "slurm" / "logs"
    print(f"submitted job {job_id}: {sweep_dir / 'slurm' / 'job.sbatch'}\n"
          f"log: {log_dir}/{cfg.job_name}-{job_id}.out   status: scontrol show job {job_id}")
    return 0

