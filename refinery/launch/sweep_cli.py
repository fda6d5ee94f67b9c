"""`refinery sweep SWEEP.yaml [overrides] [--address auto]` and `refinery sweep status SWEEP_DIR`:
their options and what they run (the sweep itself: refinery/cluster/sweep.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from refinery.core.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the sweep's YAML, e.g. configs/sweep-quickstart.yaml; or `status`")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the sweep config (after `status`: the sweep dir)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (e.g. auto); default: local Ray")


def run(args) -> int:
    if args.config == "status":  # `refinery sweep status SWEEP_DIR`
        from refinery.cluster.results import print_status

        if len(args.overrides) != 1:
            print("usage: refinery sweep status SWEEP_DIR", file=sys.stderr)
            return 2
        return print_status(Path(args.overrides[0]))
    from refinery.cluster.sweep import run_sweep
    from refinery.train.preempt import Preempted

    try:
        out = run_sweep(args.config, args.overrides, args.address)
    except ConfigError as e:
        print(f"refinery sweep: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"refinery sweep: {e}", file=sys.stderr)
        return 128 + e.signum
    print(f"\nsweep done: {out}/results.csv, {out}/best.yaml")
    failed = [r["key"] for r in json.loads((out / "unfinished.json").read_text()) if r["why"].startswith("failed")]
    if failed:  # after Tune's retries: a user must not take a sweep of failed trials for a finished one
        print(f"refinery sweep: {len(failed)} configuration(s) failed for good ({', '.join(failed)}): the errors "
              f"are in {out}/unfinished.json, the chains' logs in {out}/runs/KEY-r*/trial.log", file=sys.stderr)
        return 1
    return 0
