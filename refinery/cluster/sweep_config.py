"""The sweep YAML: a pipeline config, the dotted keys to search over, and how to search.

    base: configs/quickstart.yaml
    sweep_dir: runs/sweep-quickstart
    overrides: [evaluate.models=[student_quant]]      # applied to every trial
    space:
      distill.optim.lr: {type: loguniform, low: 0.005, high: 0.05}
      distill.optim.name: {type: choice, values: [muon, adamw]}
      quantize.group_size: {type: choice, values: [32, 64]}
    num_samples: 6
    replicates: 2            # seeds per configuration: mean and spread
    objective: {metric: accuracy}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from refinery.core.config import ConfigError, apply_overrides, build, check, load_yaml

SEARCHABLE = ("distill.", "quantize.", "evaluate.latency.")
"""Sections a trial may vary. generate runs once per sweep (shared data); tasks and models are fixed."""


@dataclass
class Param:
    """One search dimension."""

    type: Literal["loguniform", "uniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    def __post_init__(self):
        if self.type == "choice":
            check(bool(self.values), "values", self.values, "a non-empty list for type choice")
        else:
            check(self.low is not None and self.high is not None and self.low < self.high, "low/high",
                  (self.low, self.high), f"two numbers low < high for type {self.type}")
            check(self.type != "loguniform" or self.low > 0, "low", self.low, "a number > 0 for loguniform")


@dataclass
class ObjectiveConfig:
    """score = accuracy - bytes_weight * GB - latency_weight * decode ms/token, on the quantized student."""

    metric: Literal["accuracy", "weighted", "pareto"] = "accuracy"
    """accuracy: mean quantized accuracy over the run's tasks. weighted: the formula above. pareto:
    multi-objective search (Optuna's multi-objective TPE/GP) over `pareto_of`, accuracy up, the others
    down; the results table marks the front and best.yaml is the front's most accurate point."""
    bytes_weight: float = 0.0
    latency_weight: float = 0.0
    model: Literal["student_quant", "student"] = "student_quant"
    """Which evaluated model the objective reads (the quantized one unless you say otherwise)."""
    pareto_of: list[str] = field(default_factory=lambda: ["accuracy", "bytes"])
    """The objectives of metric: pareto, from accuracy, bytes and decode_ms (decode_ms needs
    evaluate.latency.enabled=true in the trials)."""

    def __post_init__(self):
        check("accuracy" in self.pareto_of and len(set(self.pareto_of)) == len(self.pareto_of) >= 2
              and set(self.pareto_of) <= {"accuracy", "bytes", "decode_ms"}, "pareto_of", self.pareto_of,
              "accuracy and at least one of bytes, decode_ms, each once")

    def modes(self) -> list[str]:
        return ["max" if m == "accuracy" else "min" for m in self.pareto_of]


@dataclass
class AshaConfig:
    """Early stopping (ASHA) on the distill loss while a trial trains (the objective comes only at the end).

    The loss is comparable across trials only when the search space keeps its scale: leave
    distill.loss.temperature/alpha/divergence out of the space when ASHA is on."""

    grace_steps: int = 20
    """Distill steps every trial gets before it can be stopped."""
    reduction_factor: int = 3
    report_every: int = 10
    """Distill steps between intermediate reports (mean loss of those steps)."""

    def __post_init__(self):
        for name in ("grace_steps", "reduction_factor", "report_every"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        check(self.reduction_factor >= 2, "reduction_factor", self.reduction_factor, "an integer >= 2")


@dataclass
class SweepConfig:
    base: str
    """The pipeline YAML every trial starts from (e.g. configs/quickstart.yaml)."""
    space: dict[str, Param]
    sweep_dir: str = "runs/sweep"
    """Trial run dirs, Tune's state (`tune/`), results. On a cluster: a path every node sees at the same
    path (a trial retried on another node resumes from its checkpoints there): docs/multinode.md."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to the base config of every trial (before the trial's own values)."""
    num_samples: int = 6
    """Configurations tried (each run `replicates` times)."""
    replicates: int = 1
    searcher: Literal["optuna", "gp", "random"] = "optuna"
    """optuna: Optuna's TPE (Bayesian) through Ray Tune's OptunaSearch; gp: Optuna's Gaussian-process
    sampler (needs scipy) through the same; random: Tune's random search."""
    max_concurrent: int = 1
    """Trials at once; each takes `cpus_per_trial` CPUs (and `gpus_per_trial` GPUs) from Ray."""
    cpus_per_trial: int = 2
    gpus_per_trial: float = 0
    seed: int = 0
    """Searcher seed; replicate k of a configuration trains with seed base.seed + k."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    scheduler: Literal["none", "asha"] = "none"
    asha: AshaConfig = field(default_factory=AshaConfig)

    def __post_init__(self):
        check(bool(self.space), "space", self.space, "at least one dotted key to search over")
        for key in self.space:
            check(key.startswith(SEARCHABLE), f"space.{key}", key,
                  f"a key under {', '.join(SEARCHABLE)} (generate runs once per sweep; models and tasks are fixed)")
        for name in ("num_samples", "replicates", "max_concurrent", "cpus_per_trial"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")


def load_sweep(path: str, overrides: list[str] = ()) -> SweepConfig:
    """Load and check a sweep YAML, and check that every searched key exists in the base config."""
    from refinery.pipeline.config import load

    data = load_yaml(path)
    apply_overrides(data, list(overrides))
    cfg = build(SweepConfig, data)
    load(cfg.base, cfg.overrides)  # the base itself must be valid
    for key, p in cfg.space.items():
        probe = p.values[0] if p.type == "choice" else (p.low if p.type != "int" else int(p.low))
        try:
            load(cfg.base, [*cfg.overrides, f"{key}={_yaml(probe)}"])
        except ConfigError as e:
            raise ConfigError(f"space.{key}: {e}") from None
    return cfg


def _yaml(value: Any) -> str:
    import json

    return json.dumps(value)  # JSON is YAML: lists, strings and numbers survive the override parser
