"""`refinery`: run the whole pipeline or one stage.

    refinery run configs/quickstart.yaml [dotted.key=value ...]
    refinery generate|teacher-logits|distill|quantize|evaluate|report CONFIG [overrides]
    refinery distill CONFIG --nproc 2 [distill.parallel.strategy=fsdp2]   # torchrun, N processes
    refinery distill CONFIG --nnodes 2 --node-rank R [--nproc 2]         # on each node (train/nodes.py)
    refinery check CONFIG [overrides]        # validate only, print the resolved config
    refinery models list | pull NAME | import FILE.gguf [--name N]   # qwen2.5-coder-1.5b/-0.5b, any GGUF
    refinery sweep SWEEP.yaml [--address auto] | refinery sweep status SWEEP_DIR
    refinery cluster slurm SWEEP.yaml [--nodes N --time T] [--dry-run]   # sbatch: Ray + sweep driver, requeue
    refinery quantize CONFIG --checkpoints P [P ...] | --sweep DIR --out DIR   # many checkpoints, one job
    refinery evaluate CONFIG --models P [P ...] --out DIR      # vLLM evaluation workers, many models
    refinery batch CONFIG --checkpoints P [P ...] | --sweep DIR --out DIR    # both, in one job
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from refinery.core.config import ConfigError, UserError, parse_with_overrides, to_dict
from refinery.core.proc import setup_logging
from refinery.launch import batch, many_cli, models_cli, slurm_cli, sweep_cli
from refinery.pipeline.stages import STAGES

STAGE_CMDS = tuple(s.name for s in STAGES)
# subcommands with their own options: (help, module with add_arguments(parser) and run(args) -> int)
TOOLS = {
    "models": ("offline model registry and GGUF import (refinery models list | pull NAME | import FILE.gguf "
               "[--name N])", models_cli),
    "sweep": ("Bayesian hyperparameter sweep (refinery sweep SWEEP.yaml | status DIR)", sweep_cli),
    "batch": ("quantize and evaluate many checkpoints in one job (refinery batch CONFIG --checkpoints P ... "
              "--out DIR)", batch),
}
CLUSTER = {"slurm": ("submit a sweep as a Slurm batch job with Ray (refinery cluster slurm SWEEP.yaml [--nodes N "
                     "...] [--dry-run])", slurm_cli)}
# the stages with a many-checkpoint form: (its options, what runs it)
MANY = {"quantize": (many_cli.add_quantize_options, many_cli.quantize_run),
        "evaluate": (many_cli.add_evaluate_options, many_cli.evaluate_run)}


def _parser() -> argparse.ArgumentParser:
    """One parser: a subcommand per stage of the stage table (pipeline.stages.STAGES), `run` and
    `check`, and the tools; quantize and evaluate also take their many-checkpoint options."""
    p = argparse.ArgumentParser(prog="refinery", description="Distill, quantize and evaluate a small student LLM.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (help_, mod) in TOOLS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        mod.add_arguments(sp)
        sp.set_defaults(handler=mod.run)
    cluster = sub.add_parser("cluster", help="run a sweep on a cluster (refinery cluster slurm SWEEP.yaml "
                                             "[--nodes N ...] [--dry-run])")
    kinds = cluster.add_subparsers(dest="kind", required=True)
    for name, (help_, mod) in CLUSTER.items():
        sp = kinds.add_parser(name, help=help_, description=help_)
        mod.add_arguments(sp)
        sp.set_defaults(handler=mod.run)
    for name, help_ in [("run", "all stages, skipping those already complete"),
                        ("check", "validate a config and print it resolved"),
                        *[(s, f"only the {s} stage (needs the previous stages' outputs)") for s in STAGE_CMDS]]:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(handler=None, many=None)
        sp.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.steps=50")
        sp.add_argument("-v", "--verbose", action="store_true",
                        help="show third-party output (vLLM's config, library warnings; or REFINERY_VERBOSE=1) "
                             "and the traceback of an expected error (bad config, input file)")
        if name != "check":
            sp.add_argument("--force", action="store_true", help="re-run even if the stage is complete")
            sp.add_argument("--reuse", default="", metavar="STAGES",
                            help="comma-separated stages whose outputs are taken as they are even if made "
                                 "for another config (their files are still checked), e.g. generate")
        if name == "run":
            sp.add_argument("--stages", default=None,
                            help="comma-separated subset of the stages to run, e.g. distill,quantize,evaluate")
        if name in ("run", "distill"):
            sp.add_argument("--nproc", type=int, default=None,
                            help="training processes (sets distill.parallel.nproc; strategy ddp unless set)")
            sp.add_argument("--nnodes", type=int, default=None,
                            help="nodes in the distill job (sets distill.parallel.nnodes; same command on each)")
            sp.add_argument("--node-rank", type=int, default=None,
                            help="this node's index: 0 runs the stage, others join it (default: SLURM_NODEID)")
        if name in MANY:
            add_options, run_many = MANY[name]
            add_options(sp)
            sp.set_defaults(many=run_many)
    return p


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parse_with_overrides(parser, argv)  # overrides may also follow the options
    setup_logging(loud=getattr(args, "verbose", False))
    if args.handler is not None:  # a tool: its own module runs it
        return args.handler(args)
    if args.many is not None:
        stray = many_cli.stray_option(args)
        if stray:  # it would be silently ignored by the run's own stage
            need = "--checkpoints P [P ...] or --sweep DIR" if args.cmd == "quantize" else "--models P [P ...]"
            parser.error(f"{args.cmd} {stray}: give {need} too (without them {args.cmd} is the run's own stage)")
        if many_cli.is_many(args):
            return args.many(args)
    try:
        cfg = _load(args)
        if _other_node(args, cfg):
            from refinery.train import nodes

            return nodes.join(cfg, since=started)
        from refinery.pipeline.preflight import preflight

        stages = (args.stages.split(",") if args.stages else None) if args.cmd == "run" else \
            None if args.cmd == "check" else [args.cmd]
        preflight(cfg, stages)
    except UserError as e:
        if args.verbose:
            raise
        print(f"refinery: {'config error: ' if isinstance(e, ConfigError) else ''}{e}", file=sys.stderr)
        return 2
    if args.cmd == "check":
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from refinery.pipeline.stages import run_pipeline, run_stage
    from refinery.train.preempt import Preempted

    logging.getLogger("refinery").info("run dir: %s", cfg.run_dir)
    reuse = frozenset(x for x in getattr(args, "reuse", "").split(",") if x)
    if reuse - set(STAGE_CMDS):
        print(f"refinery: --reuse: unknown stage {sorted(reuse - set(STAGE_CMDS))[0]!r}; stages: "
              f"{', '.join(STAGE_CMDS)}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "run":
            bad = sorted(set(stages or []) - set(STAGE_CMDS))
            if bad:
                print(f"refinery: --stages: unknown stage {bad[0]!r}; stages: {', '.join(STAGE_CMDS)}", file=sys.stderr)
                return 2
            results = run_pipeline(cfg, stages, force=args.force, reuse=reuse, checked=True)
        else:
            results = [run_stage(cfg, args.cmd, force=args.force, reuse=reuse)]
    except (UserError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"refinery: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"refinery: {e}", file=sys.stderr)
        return 128 + e.signum  # as if killed by the signal, after a clean checkpoint
    if cfg.distill.parallel.nnodes > 1 and any(r["stage"] == "distill" and r["skipped"] for r in results):
        from refinery.train import nodes

        nodes.announce(cfg.run_dir, status="skipped", attempt="")  # the other nodes stop waiting
    _summary(cfg, results)
    return 0


def _load(args):
    """The config with the launch options applied (`--nproc N` or `--nnodes N` alone: strategy ddp)."""
    from refinery.pipeline.config import load

    overrides = list(args.overrides)
    for opt in ("nproc", "nnodes", "node_rank"):
        if getattr(args, opt, None) is not None:
            overrides.append(f"distill.parallel.{opt}={getattr(args, opt)}")
    if (args.cmd in ("run", "distill") and (args.nproc or 1) * (args.nnodes or 1) > 1
            and load(args.config, args.overrides).distill.parallel.strategy == "none"):
        overrides.append("distill.parallel.strategy=ddp")
    return load(args.config, overrides)


def _other_node(args, cfg) -> bool:
    """Whether this is a node other than 0 of a multi-node distill (it only joins node 0's job)."""
    if args.cmd not in ("run", "distill") or cfg.distill.parallel.nnodes == 1:
        return False
    from refinery.train import nodes

    if nodes.node_rank(cfg.distill.parallel) == 0:
        return False
    if args.cmd == "run":
        raise UserError("refinery run goes on node 0 only; on the other nodes run `refinery distill "
                        "CONFIG --nnodes N --node-rank R` (it joins node 0's distill job)")
    return True


def _summary(cfg, results: list[dict]) -> None:
    print(f"\n{'stage':<10} {'status':<10} {'wall s':>8}")
    for r in results:
        status = "skipped" if r["skipped"] else "done"
        print(f"{r['stage']:<10} {status:<10} {r.get('wall_s', 0):>8.1f}")
    report = f"{cfg.run_dir}/report/REPORT.md"
    print(f"\noutputs: {cfg.run_dir}/  (report: {report})")


def exit_program(code: int) -> None:
    """End the program with `code`. Once Ray was used in this process, Python's exit handlers run (Ray's
    own shutdown among them) and the process ends without C++ static destructors: Ray 2.60's can
    deadlock there (seen under load after a Ray Train distill: the main thread joining an io thread
    that waits on a lock), leaving a finished command hanging forever."""
    if "ray" in sys.modules:
        import atexit
        import os

        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def entry() -> None:
    """The `refinery` program: `main`'s exit code, also when it raises (an error after Ray was used must
    not hang either)."""
    try:
        code = main()
    except SystemExit as e:  # argparse, and handlers that exit
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 (the program ends here: print it, exit 1)
        import traceback

        traceback.print_exc()
        code = 1
    exit_program(code)


if __name__ == "__main__":
    entry()
