"""What GPTQ will quantize in a checkpoint, and whether a group size fits it.

GPTQ splits each linear layer's input columns into groups of `group_size`. A size that does
not divide a layer's input width saves fine but vLLM fails at load (REFERENCE.md: g128 on
SmolLM2, hidden 576), so the stage checks every layer before spending time on calibration.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable

from refinery.core.config import ConfigError
from refinery.core import gguf_import


def quantizable_widths(model_dir: str | Path, trust_remote_code: bool = False) -> dict[str, int]:
    """{module name: input width} of the linear layers GPTQ quantizes (all but the output head).

    The model is built on the meta device from its config, so this costs no weight loading.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    return {name: m.in_features for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head}


def valid_group_sizes(widths: dict[str, int]) -> list[int]:
    """Group sizes that divide every width: -1 and the powers of two >= 16 dividing their gcd."""
    g = math.gcd(*widths.values()) if widths else 0
    return [-1] + [2 ** k for k in range(4, 16) if g and g % (2 ** k) == 0]


def check_group_size(widths: dict[str, int], group_size: int) -> None:
    """Raise ConfigError naming the first layer whose input width `group_size` does not divide."""
    if not widths:
        raise ConfigError("quantize: the model has no linear layers to quantize")
    if group_size == -1:
        return
    for name, width in widths.items():
        if width % group_size:
            valid = ", ".join(str(v) for v in valid_group_sizes(widths))
            raise ConfigError(
                f"quantize.group_size: {group_size} does not divide the input width {width} of layer "
                f"{name!r} (vLLM cannot load such a checkpoint); valid group sizes for this model: {valid}")


def safetensors_bytes(model_dir: str | Path, select: Callable[[str], bool] = lambda name: True) -> int:
    """Bytes of the tensors whose names `select` accepts, over all *.safetensors files in `model_dir`.

    Reads only the JSON headers, so it is cheap on any checkpoint size.
    """
    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for path in files:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__" and select(name):
                start, end = info["data_offsets"]
                total += end - start
    return total


def in_layers(widths: dict[str, int]) -> Callable[[str], bool]:
    """A `select` for safetensors_bytes: tensors belonging to the quantized modules in `widths`."""
    prefixes = tuple(f"{name}." for name in widths)

    def select(tensor: str) -> bool:
        return tensor.startswith(prefixes)

    return select


def check_widths(cfg) -> None:
    """quantize.group_size against the student's layer widths, from its config.json alone."""
    student = cfg.models.student.path
    where = gguf_import.model_dir(student or cfg.models.teacher)  # a derived student keeps widths
    if where is None:  # not on this machine yet (a registry model not pulled, a hub name): checked at quantize
        return
    check_group_size(quantizable_widths(where, cfg.models.trust_remote_code), cfg.quantize.group_size)
