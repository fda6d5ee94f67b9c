"""The stage contract: what every stage receives (Context), returns (Result) and declares (Stage)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from refinery.core.models import ModelsConfig
from refinery.core.tasks import TasksConfig


@dataclass
class Context:
    """Run-wide settings shared by the stages; each stage also gets its own config section."""

    run_dir: Path
    seed: int
    models: ModelsConfig
    tasks: TasksConfig
    dirs: dict[str, Path] = field(default_factory=dict)
    """Where a stage writes when not in `run_dir/<stage>` (a re-run's staging dir)."""

    def stage_dir(self, stage: str) -> Path:
        return Path(self.dirs[stage]) if stage in self.dirs else self.run_dir / stage


@dataclass
class Result:
    """What a stage returns: metrics for its manifest and the files it wrote (relative to its dir)."""

    metrics: dict
    outputs: list[str]


def _no_needs(cfg) -> tuple[str, ...]:
    return ()


def _always(cfg) -> bool:
    return True


def _keep(section: dict) -> dict:
    return section


def _no_checks(cfg) -> None:
    return None


@dataclass(frozen=True)
class Stage:
    """One entry of the stage table: all the runner (refinery.core.runner) knows of a stage. The
    stage's own rules are these fields; the runner only walks the table."""

    name: str
    section: str
    """The config attribute holding this stage's settings; `run` gets it."""
    run: Callable[[Context, Any], Result]
    """run(ctx, section) -> Result, writing into ctx.stage_dir(name)."""
    needs: tuple[str, ...] = ()
    """The stages whose outputs it always reads."""
    carry: tuple[str, ...] = ()
    """What a re-run over complete outputs starts from (globs in the stage dir): the stage resumes
    from these by its own keys. A stage without them re-runs into an empty staging dir."""
    tasks: tuple[str, ...] | None = ()
    """The run-wide `tasks` keys its outputs depend on (None: all of them; (): none)."""
    more_needs: Callable[[Any], tuple[str, ...]] = _no_needs
    """Needs that depend on the config (distill reads the top-k cache only when teacher_source=topk)."""
    wanted: Callable[[Any], bool] = _always
    """Whether `refinery run` runs it under this config."""
    hashed: Callable[[dict], dict] = _keep
    """The section's keys that enter its identity (the process layout, `parallel`, never does)."""
    preflight: Callable[[Any], None] = _no_checks
    """Checks run before any stage's work (no model weights loaded); raise ConfigError."""

    def all_needs(self, cfg) -> tuple[str, ...]:
        return self.needs + self.more_needs(cfg)
