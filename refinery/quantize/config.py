"""Config of the `quantize` stage: merge LoRA, then GPTQ."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from refinery.core.config import check


@dataclass
class QuantizeConfig:
    """GPTQ W{bits}A16 with GPTQModel, calibrated on the generated task data."""

    method: Literal["gptq"] = "gptq"
    bits: int = 4
    group_size: int = 64
    """Must divide every quantized layer's input width, or vLLM cannot load the result."""
    act_order: bool = True
    sym: bool = True
    damp_percent: float = 0.05
    calibration_samples: int = 128
    calibration_max_len: int = 256

    def __post_init__(self):
        check(self.bits in (3, 4, 8), "bits", self.bits, "3, 4 or 8")
        check(self.group_size == -1 or self.group_size >= 16, "group_size", self.group_size, "-1 or an integer >= 16")
        check(0 < self.damp_percent < 1, "damp_percent", self.damp_percent, "a number in (0, 1)")
        check(self.calibration_samples >= 1, "calibration_samples", self.calibration_samples, "an integer >= 1")
