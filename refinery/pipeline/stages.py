"""The pipeline's stage table (core.stage.Stage entries, in run order) and the runner over it
(core.runner). Each stage's rules (needs, identity, checks) come from its own package's config
module; its work is imported only when it runs, so the CLI starts without torch."""
from __future__ import annotations

import importlib

from refinery.core import runner
from refinery.core.stage import Stage
from refinery.distill.config import GENERATE_TASKS, generate_preflight
from refinery.evals.config import evaluate_preflight
from refinery.quantize.config import quantize_preflight
from refinery.train.config import distill_needs, hashed, teacher_logits_wanted


def _when_run(module: str):
    """The stage's `run(ctx, section)` of `module`, imported at its first call (torch and vLLM load
    only for a stage that works; the CLI itself starts in ~0.1 s)."""
    def run(ctx, cfg):
        return importlib.import_module(module).run(ctx, cfg)

    run.__qualname__ = f"{module}.run"
    return run


STAGES = (
    Stage("generate", "generate", _when_run("refinery.distill.generate"), tasks=GENERATE_TASKS,
          preflight=generate_preflight),
    Stage("teacher-logits", "teacher_logits", _when_run("refinery.train.teacher_logits"), ("generate",),
          carry=("shard-*.safetensors",), wanted=teacher_logits_wanted),
    Stage("distill", "distill", _when_run("refinery.train.launch"), ("generate",),
          carry=("checkpoints", "metrics.jsonl", "qat_diagnostics.jsonl"), more_needs=distill_needs, hashed=hashed),
    Stage("quantize", "quantize", _when_run("refinery.quantize.gptq"), ("distill",), preflight=quantize_preflight),
    Stage("evaluate", "evaluate", _when_run("refinery.evals.evaluate"), ("distill", "quantize"), tasks=None,
          preflight=evaluate_preflight),
    Stage("report", "report", _when_run("refinery.evals.report"), ("evaluate",), tasks=None),
)
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
