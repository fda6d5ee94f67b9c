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


# What of the run-wide `tasks` section each stage reads (the rest reaches it through its inputs).
TASK_KEYS = {"generate": ("names", "eval_fraction"), "evaluate": None, "report": None}


def stage_identity(cfg, stage: Stage) -> tuple[dict, str]:
    """The resolved config a stage depends on, and its hash (process layout excluded: N ranks train
    like one, so `--nproc` alone does not make a finished distill stale)."""
    section = to_dict(getattr(cfg, stage.section))
    resolved = {"seed": cfg.seed, "models": to_dict(cfg.models), stage.section: section}
    if stage.name in TASK_KEYS:
        tasks = to_dict(cfg.tasks)
        keys = TASK_KEYS[stage.name]
        resolved["tasks"] = tasks if keys is None else {k: tasks[k] for k in keys}
    kept = {k: v for k, v in section.items() if k != "parallel"}
    if stage.section == "distill":  # distill.qat enters the hash only when enabled (old runs keep theirs)
        from refinery.train.config import hashed as distill_hashed

        kept = distill_hashed(kept)
    hashed = {**resolved, stage.section: kept}
    return resolved, config_hash(hashed)


def check_fresh(cfg, need: str) -> None:
    """Refuse to read a needed stage's outputs made for another config (only teacher-logits is
    checked: its settings are not part of the reader's config, so nothing else would notice)."""
    from refinery.core.config import ConfigError
    from refinery.core.manifest import read_manifest

    if need != "teacher-logits":
        return
    out = cfg.context().stage_dir(need)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out} has no complete teacher-logits output: run `refinery teacher-logits CONFIG` "
                                "(or `refinery run CONFIG`)")
    if read_manifest(out).get("config_hash") != stage_identity(cfg, BY_NAME[need])[1]:
        raise ConfigError(f"{out} was made for another teacher_logits / models config: run "
                          "`refinery teacher-logits CONFIG` again (or `refinery run CONFIG`)")


def run_stage(cfg, name: str, force: bool = False) -> dict:
    """Run one stage unless a complete manifest for the same config and inputs exists."""
    stage = BY_NAME[name]
    ctx = cfg.context()
    out_dir = ctx.stage_dir(name)
    for need in needs(cfg, stage):
        check_fresh(cfg, need)
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
    todo = [s.name for s in STAGES if wanted(cfg, s) and (stages is None or s.name in stages)]
    if "evaluate" in todo and cfg.evaluate.backend == "vllm" and "student_quant" in cfg.evaluate.models:
        from refinery.quantize.serve_check import refuse_unservable_bits

        # before any stage's work, not when evaluate starts the engine
        refuse_unservable_bits(cfg.quantize.bits, "evaluate.backend=vllm scores student_quant with vLLM")
    return [run_stage(cfg, name, force) for name in todo]
