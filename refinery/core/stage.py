"""What every stage receives: the run directory, seed, models and tasks of the run."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
