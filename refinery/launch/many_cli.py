"""The many-checkpoint forms of `refinery quantize` and `refinery evaluate`: their options and what
they run (options of the same subcommands as the single-run stages; refinery.launch.cli).

    refinery quantize CONFIG --checkpoints P [P ...] | --sweep DIR --out DIR   # GPTQ workers, one job
    refinery evaluate CONFIG --models P [P ...] --out DIR                      # vLLM evaluation workers
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from refinery.core.config import UserError
from refinery.evals.batch import RUN_MODELS, evaluate_many, resolve_models, table
from refinery.pipeline.config import PipelineConfig, load
from refinery.quantize.batch import METHODS, format_table, quantize_many, sweep_sources
from refinery.quantize.config import QuantizeConfig


def add_quantize_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("many checkpoints (GPTQ workers, one job; instead of the run's own model)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--checkpoints", nargs="+", metavar="P",
                     help="run dirs, distill dirs, adapter or float model dirs")
    src.add_argument("--sweep", type=Path, help="a sweep dir: every run with a finished distill stage")
    g.add_argument("--out", type=Path, default=None, help="output dir: <out>/<name>/ per checkpoint, quantize.csv")
    g.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU; 1 on CPU)")
    g.add_argument("--method", choices=METHODS, default=None, help="gptq or rtn (default: the config's)")
    g.add_argument("--data", type=Path, default=None, help="generate/data.jsonl for calibration and error rows")


def add_evaluate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("many models (vLLM evaluation workers; instead of the run's own models)")
    g.add_argument("--models", nargs="+", default=None,
                   help=f"HF model dirs (float or GPTQ) and/or run models ({', '.join(RUN_MODELS)})")
    g.add_argument("--out", type=Path, default=None, help="output dir: <out>/<name>/results.json, <out>/evaluate.csv")
    g.add_argument("--workers", type=int, default=None, help="pool size (default: evaluate.workers; 1 on CPU)")
    g.add_argument("--latency", action=argparse.BooleanOptionalAction, default=None,
                   help="measure latency and memory (default: evaluate.latency.enabled)")


MANY_ONLY = ("out", "workers", "method", "data", "latency")
"""Options that only the many-checkpoint form reads."""


def stray_option(args) -> str | None:
    """A many-checkpoint-only option given without the list it applies to (it would be ignored)."""
    if is_many(args):
        return None
    return next((f"--{k}" for k in MANY_ONLY if getattr(args, k, None) is not None), None)


def is_many(args) -> bool:
    """Whether a quantize/evaluate command line names many checkpoints (else: the run's own stage)."""
    return bool(getattr(args, "checkpoints", None) or getattr(args, "sweep", None) or getattr(args, "models", None))


def split_overrides(args) -> list[str]:
    """Overrides typed inside a list option (--checkpoints, --models) move to the overrides;
    `bits=3` is short for `quantize.bits=3`."""
    over = list(args.overrides)
    for attr in ("checkpoints", "models"):
        items = getattr(args, attr, None)
        if items:
            moved = [c for c in items if "=" in c and not Path(c).exists()]
            over += moved
            setattr(args, attr, [c for c in items if c not in moved])
    top = {f.name for f in fields(PipelineConfig)}
    quant = {f.name for f in fields(QuantizeConfig)}
    return [f"quantize.{o}" if o.split("=", 1)[0].split(".")[0] in quant - top else o for o in over]


def quantize_run(args) -> int:
    """`refinery quantize CONFIG --checkpoints P [P ...] | --sweep DIR --out DIR [k=v ...]`."""
    try:
        cfg = load(args.config, split_overrides(args))
        if args.out is None:
            raise UserError("quantize --checkpoints/--sweep: give --out DIR (where the quantized models go)")
        sources = sweep_sources(args.sweep) if args.sweep else args.checkpoints
        records = quantize_many(cfg, sources, args.out, args.workers, args.method, args.data, args.sweep)
    except (UserError, FileNotFoundError) as e:
        print(f"refinery quantize: {e}", file=sys.stderr)
        return 2
    print("\n" + format_table(records))
    print(f"\noutputs: {args.out}/<name>/gptq  (summary: {args.out / 'quantize.csv'})")
    return 1 if any(r["status"] == "failed" for r in records) else 0


def evaluate_run(args) -> int:
    """`refinery evaluate CONFIG --models P [P ...] --out DIR [--workers N] [--latency|--no-latency] [k=v ...]`."""
    try:
        cfg = load(args.config, split_overrides(args))
        if args.out is None:
            raise UserError("evaluate --models: give --out DIR (where the scores go)")
        models = resolve_models(cfg, args.models)
        latency = cfg.evaluate.latency.enabled if args.latency is None else args.latency
        results = evaluate_many(cfg, models, args.out, args.workers, latency)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"refinery evaluate: {e}", file=sys.stderr)
        return 2
    print(table(results))
    print(f"\nresults: {args.out}/<model>/results.json, {args.out}/evaluate.csv")
    return 0
