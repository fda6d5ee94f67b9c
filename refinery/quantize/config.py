"""Config of the `quantize` stage: merge LoRA, then GPTQ."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from refinery.core.config import check


@dataclass
class QuantizeConfig:
    """GPTQ W{bits}A16 with GPTQModel, calibrated on the generated task data."""

    method: Literal["gptq", "rtn", "qat_rtn"] = "gptq"
    """gptq: GPTQModel on the merged student. rtn: round-to-nearest of the merged student on the same
    grid (bits, group_size, sym; GPTQModel's RTN, no calibration, same GPTQ format): the baseline GPTQ
    must beat. qat_rtn: a KD-QAT student (distill.qat.enabled) rounded on the grid it trained with
    (bits, group_size, sym must equal distill.qat's; no calibration)."""
    bits: int = 4
    group_size: int = 64
    """Must divide every quantized layer's input width, or vLLM cannot load the result (checked before
    quantizing; -1 = one group per output channel)."""
    act_order: bool = True
    """Quantize columns in order of activation magnitude, with static groups (GPTQModel's
    `act_group_aware`): the checkpoint keeps desc_act=false, so vLLM still loads it."""
    desc_act: bool = False
    """Classic dynamic activation ordering (GPTQ `desc_act`). transformers loads the result but
    vLLM 0.32 refuses it; exclusive with `act_order`."""
    sym: bool = True
    damp_percent: float = 0.05
    calibration_samples: int = 128
    """Texts from generate/data.jsonl used to calibrate (rows held out for the error metric are never used)."""
    calibration_max_len: int = 256
    """Calibration texts are truncated to this many tokens."""
    calibration_batch_size: int = 8
    """Calibration texts per forward pass in GPTQ (GPTQModel's `batch_size`; texts of similar length
    are batched, padding is masked out of the Hessians). 8 instead of 1: GPTQ 0.6x the time on the
    quickstart student, KL to the float model within run-to-run noise (BENCHMARKS.md)."""
    error_samples: int = 8
    """Held-out data.jsonl rows on which the quantized model is compared with the merged one (KL, perplexity)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the weights GPTQ leaves unquantized (embeddings, norms, lm_head) in the GPTQ checkpoint."""
    merge_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the merged (LoRA folded in) float checkpoint."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where GPTQ runs; `auto` takes CUDA when available, else CPU."""

    def __post_init__(self):
        check(self.bits in (3, 4, 8), "bits", self.bits, "3, 4 or 8")
        check(self.group_size == -1 or self.group_size >= 16, "group_size", self.group_size,
              "-1 or an integer >= 16")
        check(not (self.act_order and self.desc_act), "desc_act", self.desc_act,
              "false when act_order is true (choose one: act_order keeps the checkpoint vLLM-loadable)")
        check(not (self.act_order and self.group_size == -1), "act_order", self.act_order,
              "false when group_size is -1 (static activation ordering works on groups)")
        check(0 < self.damp_percent < 1, "damp_percent", self.damp_percent, "a number in (0, 1)")
        check(self.calibration_samples >= 1, "calibration_samples", self.calibration_samples, "an integer >= 1")
        check(self.calibration_max_len >= 8, "calibration_max_len", self.calibration_max_len, "an integer >= 8")
        check(self.calibration_batch_size >= 1, "calibration_batch_size", self.calibration_batch_size,
              "an integer >= 1")
        check(self.error_samples >= 1, "error_samples", self.error_samples, "an integer >= 1")


def quantize_preflight(cfg) -> None:
    """quantize.group_size against the student's layer widths (from its config.json alone)."""
    if cfg.quantize.method in ("gptq", "rtn"):
        from refinery.quantize.shapes import check_widths

        check_widths(cfg)
