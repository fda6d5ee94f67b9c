"""The many-checkpoint forms of `refinery quantize` and `refinery evaluate`: their parsers and mains.

    refinery quantize CONFIG --checkpoints P [P ...] | --sweep DIR --out DIR   # GPTQ workers, one job
    refinery evaluate CONFIG --models P [P ...] --out DIR                      # vLLM evaluation workers
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from refinery.core.config import UserError, parse_with_overrides
from refinery.core.proc import setup_logging
from refinery.evals.batch import RUN_MODELS, evaluate_many, resolve_models, table
from refinery.launch.config import PipelineConfig, load
from refinery.quantize.batch import METHODS, format_table, quantize_many, sweep_sources
from refinery.quantize.config import QuantizeConfig


def _quantize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refinery quantize", description="Quantize many checkpoints in one job.")
    p.add_argument("config", help="pipeline YAML (models, quantize section, seed), e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. quantize.bits=3 (or bits=3)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", nargs="+", metavar="P",
                     help="run dirs, distill dirs, adapter or float model dirs")
    src.add_argument("--sweep", type=Path, help="a sweep dir: every run with a finished distill stage")
    p.add_argument("--out", type=Path, required=True, help="output dir: <out>/<name>/ per checkpoint, quantize.csv")
    p.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU; 1 on CPU)")
    p.add_argument("--method", choices=METHODS, default=None, help="gptq or rtn (default: the config's)")
    p.add_argument("--data", type=Path, default=None, help="generate/data.jsonl for calibration and error rows")
    return p


def split_overrides(args) -> list[str]:
    """Overrides typed after --checkpoints land in its list; `bits=3` is short for `quantize.bits=3`."""
    over = list(args.overrides)
    if args.checkpoints:
        over += [c for c in args.checkpoints if "=" in c and not Path(c).exists()]
        args.checkpoints = [c for c in args.checkpoints if c not in over]
    top = {f.name for f in fields(PipelineConfig)}
    quant = {f.name for f in fields(QuantizeConfig)}
    return [f"quantize.{o}" if o.split("=", 1)[0].split(".")[0] in quant - top else o for o in over]


def quantize_main(argv: list[str]) -> int:
    """`refinery quantize CONFIG --checkpoints P [P ...] | --sweep DIR --out DIR [k=v ...]`."""
    parser = _quantize_parser()
    args = parse_with_overrides(parser, argv)  # overrides may also follow the options
    setup_logging()
    try:
        cfg = load(args.config, split_overrides(args))
        sources = sweep_sources(args.sweep) if args.sweep else args.checkpoints
        records = quantize_many(cfg, sources, args.out, args.workers, args.method, args.data, args.sweep)
    except (UserError, FileNotFoundError) as e:
        print(f"refinery quantize: {e}", file=sys.stderr)
        return 2
    print("\n" + format_table(records))
    print(f"\noutputs: {args.out}/<name>/gptq  (summary: {args.out / 'quantize.csv'})")
    return 1 if any(r["status"] == "failed" for r in records) else 0


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Dotted overrides (key=value, not an option) apart from the rest (model paths have no '=')."""
    over = [a for a in argv if "=" in a and not a.startswith("-")]
    return [a for a in argv if a not in over], over


def evaluate_main(argv: list[str]) -> int:
    """`refinery evaluate CONFIG --models P [P ...] --out DIR [--workers N] [--latency|--no-latency] [k=v ...]`."""
    rest, overrides = _split_argv(argv)
    p = argparse.ArgumentParser(prog="refinery evaluate", description="Evaluate many models with the vLLM evaluation workers.")
    p.add_argument("config")
    p.add_argument("--models", nargs="+", required=True,
                   help=f"HF model dirs (float or GPTQ) and/or run models ({', '.join(RUN_MODELS)})")
    p.add_argument("--out", required=True, help="output dir: <out>/<name>/results.json, <out>/evaluate.csv")
    p.add_argument("--workers", type=int, default=None, help="pool size (default: evaluate.workers; 1 on CPU)")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=None,
                   help="measure latency and memory (default: evaluate.latency.enabled)")
    args = p.parse_args(rest)
    setup_logging()
    try:
        cfg = load(args.config, overrides)
        models = resolve_models(cfg, args.models)
        latency = cfg.evaluate.latency.enabled if args.latency is None else args.latency
        out = Path(args.out)
        results = evaluate_many(cfg, models, out, args.workers, latency)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"refinery evaluate: {e}", file=sys.stderr)
        return 2
    print(table(results))
    print(f"\nresults: {out}/<model>/results.json, {out}/evaluate.csv")
    return 0
