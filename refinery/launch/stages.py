"""The stage registry and the runner that skips finished stages and writes manifests."""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, replace

from refinery.core import staging
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
    carry: tuple[str, ...] = ()
    """What a re-run over complete outputs starts from (globs in the stage dir): the stage resumes
    from these by its own keys. A stage without them re-runs into an empty staging dir."""


STAGES = (
    Stage("generate", "generate", "refinery.distill.generate:run", ()),
    Stage("teacher-logits", "teacher_logits", "refinery.train.teacher_logits:run", ("generate",),
          carry=("shard-*.safetensors",)),
    Stage("distill", "distill", "refinery.train.launch:run", ("generate",),
          carry=("checkpoints", "metrics.jsonl", "qat_diagnostics.jsonl")),
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
TASK_KEYS = {"generate": ("names", "eval_fraction", "custom", "include_path"), "evaluate": None, "report": None}


def tasks_identity(tasks_cfg, keys: tuple[str, ...] | None) -> dict:
    """The `tasks` keys a stage reads, plus the hash of each user task's data (an edited task file
    makes generate and evaluate stale). Unset user-task keys are left out: runs of bundled tasks keep
    the identity they had before those keys existed."""
    from refinery.core.tasks import task_digests

    tasks = to_dict(tasks_cfg)
    out = {k: v for k, v in tasks.items() if keys is None or k in keys}
    out = {k: v for k, v in out.items() if not (k in ("custom", "include_path") and not v)}
    if keys is not None and out.get("custom"):  # generate does not read answer_regex (evaluate does)
        out["custom"] = {n: {k: v for k, v in c.items() if k != "answer_regex"} for n, c in out["custom"].items()}
    data = task_digests(tasks_cfg)
    return {**out, "data": data} if data else out


def stage_identity(cfg, stage: Stage) -> tuple[dict, str]:
    """The resolved config a stage depends on, and its hash (process layout excluded: N ranks train
    like one, so `--nproc` alone does not make a finished distill stale)."""
    section = to_dict(getattr(cfg, stage.section))
    resolved = {"seed": cfg.seed, "models": to_dict(cfg.models), stage.section: section}
    if stage.name in TASK_KEYS:
        resolved["tasks"] = tasks_identity(cfg.tasks, TASK_KEYS[stage.name])
    kept = {k: v for k, v in section.items() if k != "parallel"}
    if stage.section == "distill":  # distill.qat enters the hash only when enabled (old runs keep theirs)
        from refinery.train.config import hashed as distill_hashed

        kept = distill_hashed(kept)
    hashed = {**resolved, stage.section: kept}
    return resolved, config_hash(hashed)


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def stale_keys(recorded: dict, now: dict) -> list[str]:
    """The dotted keys whose values differ between a manifest's config and the current one."""
    a, b = _flat(recorded), _flat(now)
    return [f"{k}: {a.get(k, '(unset)')!r} when made, {b.get(k, '(unset)')!r} now"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith("distill.parallel.")]


def check_input(cfg, stage: Stage, need: str, reuse: frozenset = frozenset()) -> None:
    """Refuse to build on a needed stage's outputs that are missing, changed since they were
    written, or made for another config (unless the stage is in `reuse` or its data is external)."""
    from refinery.core.config import ConfigError
    from refinery.core.manifest import read_manifest, verify_outputs

    out = cfg.context().stage_dir(need)
    fix = f"`refinery {need} CONFIG` (or `refinery run CONFIG`)"
    m = read_manifest(out)
    if m is None or m.get("status") != "complete":
        raise FileNotFoundError(f"{stage.name} needs the outputs of {need}, and {out} has no complete manifest: "
                                f"run {fix}")
    problems = verify_outputs(out, m)
    if problems:
        raise ConfigError(f"{stage.name} needs the outputs of {need}, but {out}: {'; '.join(problems[:3])}"
                          f"{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}: run "
                          f"`refinery {need} CONFIG --force` (or `refinery run CONFIG`)")
    if m.get("external") or need in reuse:
        return
    resolved, h = stage_identity(cfg, BY_NAME[need])
    if m.get("config_hash") != h:
        diff = stale_keys(m.get("config", {}), resolved)
        raise ConfigError(f"{need} is stale for this config ({'; '.join(diff[:4]) or 'its config differs'}): "
                          f"run {fix}, or drop the override; `--reuse {need}` takes its outputs as they are")


def run_stage(cfg, name: str, force: bool = False, reuse: frozenset = frozenset()) -> dict:
    """Run one stage unless a complete manifest for the same config and inputs exists and its
    output files are as written. Needed stages must be complete, intact and made for this config."""
    from refinery.core.manifest import verify_outputs

    stage = BY_NAME[name]
    ctx = cfg.context()
    out_dir = ctx.stage_dir(name)
    for d in (name, *needs(cfg, stage)):
        staging.recover(ctx.stage_dir(d))
    for need in needs(cfg, stage):
        check_input(cfg, stage, need, reuse)
    inputs = {need: manifest_hash(ctx.stage_dir(need)) for need in needs(cfg, stage)}
    resolved, h = stage_identity(cfg, stage)
    if not force and is_complete(out_dir, h, inputs):
        problems = verify_outputs(out_dir)
        if not problems:
            log.info("%s: complete for this config, skipped (%s)", name, out_dir)
            return {"stage": name, "skipped": True}
        log.warning("%s: complete for this config, but %s: running it again", name, "; ".join(problems[:3]))
    work = staging.begin(out_dir, stage.carry)
    log.info("%s: running -> %s", name, work)
    started = time.time()
    module, func = stage.target.split(":")
    result = getattr(importlib.import_module(module), func)(replace(ctx, dirs={name: work}),
                                                            getattr(cfg, stage.section))
    m = write_manifest(work, stage=name, config=resolved, cfg_hash=h, inputs=inputs,
                       metrics=result.metrics, started=started, outputs=result.outputs)
    staging.finish(work, out_dir)
    log.info("%s: done in %.1f s", name, m["wall_s"])
    return {"stage": name, "skipped": False, "wall_s": m["wall_s"]}


def run_pipeline(cfg, stages: list[str] | None = None, force: bool = False,
                 reuse: frozenset = frozenset()) -> list[dict]:
    todo = [s.name for s in STAGES if wanted(cfg, s) and (stages is None or s.name in stages)]
    if "evaluate" in todo and cfg.evaluate.backend == "vllm" and "student_quant" in cfg.evaluate.models:
        from refinery.distill.engines import refuse_unservable_bits

        # before any stage's work, not when evaluate starts the engine
        refuse_unservable_bits(cfg.quantize.bits, "evaluate.backend=vllm scores student_quant with vLLM")
    return [run_stage(cfg, name, force, reuse) for name in todo]
