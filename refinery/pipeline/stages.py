"""The pipeline's stage table (core.stage.Stage entries, in run order) and the runner over it
(core.runner). Each stage's rules (needs, identity, checks) come from its own package's config
module; its work is imported only when it runs, so the CLI starts without torch."""
from __future__ import annotations

from refinery.core import runner
from refinery.core.stage import Stage
from refinery.distill.config import GENERATE_TASKS, generate_preflight
from refinery.evals.config import evaluate_preflight
from refinery.quantize.config import quantize_preflight
from refinery.train.config import distill_needs, hashed, teacher_logits_wanted


def _generate(ctx, cfg):
    from refinery.distill.generate import run

    return run(ctx, cfg)


def _teacher_logits(ctx, cfg):
    from refinery.train.teacher_logits import run

    return run(ctx, cfg)


def _distill(ctx, cfg):
    from refinery.train.launch import run

    return run(ctx, cfg)


def _quantize(ctx, cfg):
    from refinery.quantize.gptq import run

    return run(ctx, cfg)


def _evaluate(ctx, cfg):
    from refinery.evals.evaluate import run

    return run(ctx, cfg)


def _report(ctx, cfg):
    from refinery.evals.report import run

    return run(ctx, cfg)


STAGES = (
    Stage("generate", "generate", _generate, tasks=GENERATE_TASKS, preflight=generate_preflight),
    Stage("teacher-logits", "teacher_logits", _teacher_logits, ("generate",), carry=("shard-*.safetensors",),
          wanted=teacher_logits_wanted),
    Stage("distill", "distill", _distill, ("generate",), carry=("checkpoints", "metrics.jsonl",
                                                                 "qat_diagnostics.jsonl"),
          more_needs=distill_needs, hashed=hashed),
    Stage("quantize", "quantize", _quantize, ("distill",), preflight=quantize_preflight),
    Stage("evaluate", "evaluate", _evaluate, ("distill", "quantize"), tasks=None, preflight=evaluate_preflight),
    Stage("report", "report", _report, ("evaluate",), tasks=None),
)
NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def run_stage(cfg, name: str, force: bool = False, reuse: frozenset = frozenset()) -> dict:
    return runner.run_stage(cfg, STAGES, name, force, reuse)


def run_pipeline(cfg, names: list[str] | None = None, force: bool = False, reuse: frozenset = frozenset(),
                 checked: bool = False) -> list[dict]:
    """Every wanted stage (of `names`), after every one's preflight checks (unless `checked`: the
    CLI ran pipeline.preflight already)."""
    if not checked:
        runner.preflight(cfg, STAGES, names)
    return runner.run_pipeline(cfg, STAGES, names, force, reuse)
