"""The stage registry and the runner that skips finished stages and writes manifests."""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass

from refinery.core.config import config_hash, to_dict
from refinery.core.manifest import is_complete, manifest_hash, write_manifest

log = logging.getLogger("refinery")


@dataclass(frozen=True)
class Stage:
    name: str
    section: str
    """The PipelineConfig attribute holding this stage's config."""
    target: str
    """`module:function` called as function(ctx, cfg) -> Result; imported only when run."""
    needs: tuple[str, ...]


STAGES = (
    Stage("generate", "generate", "refinery.distill.generate:run", ()),
    Stage("teacher-logits", "teacher_logits", "refinery.train.teacher_logits:run", ("generate",)),
    Stage("distill", "distill", "refinery.train.trainer:run", ("generate",)),
    Stage("quantize", "quantize", "refinery.quantize.gptq:run", ("distill",)),
    Stage("evaluate", "evaluate", "refinery.evals.evaluate:run", ("distill", "quantize")),
    Stage("report", "report", "refinery.evals.report:run", ("evaluate",)),
)
BY_NAME = {s.name: s for s in STAGES}


def needs(cfg, stage: Stage) -> tuple[str, ...]:
    """The stages whose outputs `stage` reads under this config."""
    if stage.name == "distill" and cfg.distill.teacher_source == "topk":
        return stage.needs + ("teacher-logits",)
    return stage.needs


def wanted(cfg, stage: Stage) -> bool:
    """Whether `refinery run` runs this stage (teacher-logits only feeds a topk distill)."""
    return stage.name != "teacher-logits" or cfg.distill.teacher_source == "topk"


def stage_identity(cfg, stage: Stage) -> tuple[dict, str]:
    """The resolved config a stage depends on, and its hash."""
    resolved = {
        "seed": cfg.seed,
        "models": to_dict(cfg.models),
        "tasks": to_dict(cfg.tasks),
        stage.section: to_dict(getattr(cfg, stage.section)),
    }
    return resolved, config_hash(resolved)


def run_stage(cfg, name: str, force: bool = False) -> dict:
    """Run one stage unless a complete manifest for the same config and inputs exists."""
    stage = BY_NAME[name]
    ctx = cfg.context()
    out_dir = ctx.stage_dir(name)
    inputs = {need: manifest_hash(ctx.stage_dir(need)) for need in needs(cfg, stage)}
    resolved, h = stage_identity(cfg, stage)
    if not force and is_complete(out_dir, h, inputs):
        log.info("%s: complete for this config, skipped (%s)", name, out_dir)
        return {"stage": name, "skipped": True}
    log.info("%s: running -> %s", name, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    module, func = stage.target.split(":")
    result = getattr(importlib.import_module(module), func)(ctx, getattr(cfg, stage.section))
    m = write_manifest(out_dir, stage=name, config=resolved, cfg_hash=h, inputs=inputs,
                       metrics=result.metrics, started=started, outputs=result.outputs)
    log.info("%s: done in %.1f s", name, m["wall_s"])
    return {"stage": name, "skipped": False, "wall_s": m["wall_s"]}


def run_pipeline(cfg, stages: list[str] | None = None, force: bool = False) -> list[dict]:
    return [run_stage(cfg, s.name, force) for s in STAGES
            if wanted(cfg, s) and (stages is None or s.name in stages)]
