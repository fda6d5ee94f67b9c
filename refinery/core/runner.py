"""The runner: walks a stage table (core.stage.Stage entries), runs each stage unless its outputs
are complete, intact and made for this config and these inputs, and writes its manifest."""
from __future__ import annotations

import logging
import time
from dataclasses import replace

from refinery.core import staging
from refinery.core.config import ConfigError, config_hash, to_dict
from refinery.core.manifest import (
    is_complete,
    manifest_hash,
    read_manifest,
    verify_outputs,
    write_manifest,
)
from refinery.core.stage import Stage

log = logging.getLogger("refinery")


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


def identity(cfg, stage: Stage) -> tuple[dict, str]:
    """The resolved config a stage depends on, and its hash (process layout excluded: N ranks train
    like one, so `--nproc` alone does not make a finished distill stale)."""
    section = to_dict(getattr(cfg, stage.section))
    resolved = {"seed": cfg.seed, "models": to_dict(cfg.models), stage.section: section}
    if stage.tasks != ():
        resolved["tasks"] = tasks_identity(cfg.tasks, stage.tasks)
    kept = stage.hashed({k: v for k, v in section.items() if k != "parallel"})
    return resolved, config_hash({**resolved, stage.section: kept})


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


def check_input(cfg, stage: Stage, need: Stage, reuse: frozenset = frozenset()) -> None:
    """Refuse to build on a needed stage's outputs that are missing, changed since they were
    written, or made for another config (unless the stage is in `reuse` or its data is external)."""
    out = cfg.context().stage_dir(need.name)
    fix = f"`refinery {need.name} CONFIG` (or `refinery run CONFIG`)"
    m = read_manifest(out)
    if m is None or m.get("status") != "complete":
        raise FileNotFoundError(f"{stage.name} needs the outputs of {need.name}, and {out} has no complete "
                                f"manifest: run {fix}")
    problems = verify_outputs(out, m)
    if problems:
        raise ConfigError(f"{stage.name} needs the outputs of {need.name}, but {out}: {'; '.join(problems[:3])}"
                          f"{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}: run "
                          f"`refinery {need.name} CONFIG --force` (or `refinery run CONFIG`)")
    if m.get("external") or need.name in reuse:
        return
    resolved, h = identity(cfg, need)
    if m.get("config_hash") != h:
        diff = stale_keys(m.get("config", {}), resolved)
        raise ConfigError(f"{need.name} is stale for this config ({'; '.join(diff[:4]) or 'its config differs'}): "
                          f"run {fix}, or drop the override; `--reuse {need.name}` takes its outputs as they are")


def run_stage(cfg, table: tuple[Stage, ...], name: str, force: bool = False,
              reuse: frozenset = frozenset()) -> dict:
    """Run one stage of `table` unless a complete manifest for the same config and inputs exists and
    its output files are as written. Needed stages must be complete, intact and made for this config."""
    by_name = {s.name: s for s in table}
    stage = by_name[name]
    ctx = cfg.context()
    out_dir = ctx.stage_dir(name)
    needs = stage.all_needs(cfg)
    for d in (name, *needs):
        staging.recover(ctx.stage_dir(d))
    for need in needs:
        check_input(cfg, stage, by_name[need], reuse)
    inputs = {need: manifest_hash(ctx.stage_dir(need)) for need in needs}
    resolved, h = identity(cfg, stage)
    if not force and is_complete(out_dir, h, inputs):
        problems = verify_outputs(out_dir)
        if not problems:
            log.info("%s: complete for this config, skipped (%s)", name, out_dir)
            return {"stage": name, "skipped": True}
        log.warning("%s: complete for this config, but %s: running it again", name, "; ".join(problems[:3]))
    work = staging.begin(out_dir, stage.carry)
    log.info("%s: running -> %s", name, work)
    started = time.time()
    result = stage.run(replace(ctx, dirs={name: work}), getattr(cfg, stage.section))
    m = write_manifest(work, stage=name, config=resolved, cfg_hash=h, inputs=inputs,
                       metrics=result.metrics, started=started, outputs=result.outputs)
    staging.finish(work, out_dir)
    log.info("%s: done in %.1f s", name, m["wall_s"])
    return {"stage": name, "skipped": False, "wall_s": m["wall_s"]}


def todo(cfg, table: tuple[Stage, ...], names: list[str] | None = None) -> list[Stage]:
    """The stages `refinery run` runs under this config (all wanted ones, or those of `names`)."""
    return [s for s in table if s.wanted(cfg) and (names is None or s.name in names)]


def run_pipeline(cfg, table: tuple[Stage, ...], names: list[str] | None = None, force: bool = False,
                 reuse: frozenset = frozenset()) -> list[dict]:
    """Every wanted stage in table order (their preflight checks are the caller's: `preflight`)."""
    return [run_stage(cfg, table, s.name, force, reuse) for s in todo(cfg, table, names)]


def preflight(cfg, table: tuple[Stage, ...], names: list[str] | None = None) -> None:
    """Each wanted stage's own checks (of `names`, None: all), before any stage's work."""
    for s in todo(cfg, table, names):
        s.preflight(cfg)
