"""The whole run's config: one section per stage plus the run-wide settings.

YAML -> dotted CLI overrides (`distill.optim.lr=3e-4`) -> typed `PipelineConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from refinery.core.config import apply_overrides, build, check, load_yaml
from refinery.core.models import ModelsConfig
from refinery.core.stage import Context
from refinery.core.tasks import TasksConfig
from refinery.distill.config import GenerateConfig
from refinery.evals.config import EvaluateConfig, ReportConfig
from refinery.quantize.config import QuantizeConfig
from refinery.train.config import DistillConfig, TeacherLogitsConfig


@dataclass
class PipelineConfig:
    """A refinery run: where outputs go, the models, the tasks and each stage's settings."""

    run_dir: str = "runs/quickstart"
    """Every stage writes `<run_dir>/<stage>/` with a manifest.json. A distill job over several nodes
    needs it on a filesystem every node sees at the same path (checkpoints, top-k cache, adapter):
    docs/multinode.md."""
    seed: int = 0
    models: ModelsConfig = field(default_factory=ModelsConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    teacher_logits: TeacherLogitsConfig = field(default_factory=TeacherLogitsConfig)
    """Only run when distill.teacher_source is topk."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self):
        check(bool(self.run_dir), "run_dir", self.run_dir, "a directory path")
        if self.distill.teacher_source == "topk":  # the cache must be made for what distill trains on
            d, t = self.distill, self.teacher_logits
            check(t.max_seq_len == d.max_seq_len, "teacher_logits.max_seq_len", t.max_seq_len,
                  f"distill.max_seq_len ({d.max_seq_len}) with distill.teacher_source=topk")
            if d.topk_tail == "bucket":
                check(t.temperature == d.loss.temperature, "teacher_logits.temperature", t.temperature,
                      f"distill.loss.temperature ({d.loss.temperature}) with distill.topk_tail=bucket")

    def context(self) -> Context:
        return Context(Path(self.run_dir), self.seed, self.models, self.tasks)


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply dotted overrides."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, list(overrides))
    return build(PipelineConfig, data)
