"""Load a model for evaluation: fp checkpoints as stored, GPTQ checkpoints through transformers.

A GPTQ dir (config.json with `quantization_config`) loads with plain `from_pretrained`: transformers
hands it to optimum + GPTQModel, which pick a CPU kernel (TorchAtenLinear) when there is no GPU.
"""
from __future__ import annotations

import json
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # GPU path: one line, nothing else differs


def is_quantized(path: str | Path) -> bool:
    """True when the checkpoint at `path` declares a quantization_config (GPTQ, ...)."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "quantization_config" in json.loads(cfg.read_text())


def load_model(path: str, dtype: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode on the default device.

    `dtype` "auto" means float32 on CPU (bf16 matmuls are slow on most CPUs) and bfloat16 on GPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"evaluate.dtype: got {dtype!r}, expected one of {', '.join(DTYPES)}")
    device = _device()
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    kwargs = {"dtype": getattr(torch, dtype), "trust_remote_code": trust_remote_code}
    if is_quantized(path):
        kwargs["device_map"] = device  # quantized layers are placed (and kernels chosen) at load
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise RuntimeError(f"evaluate: could not load the model at {path!r}: {type(e).__name__}: {e}") from e
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    return model, tok


def param_count(model) -> int:
    """Logical parameter count: a quantized linear counts in_features * out_features (+ bias)
    even though its weights are packed int32 buffers, so fp and GPTQ models compare."""
    import torch

    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:  # tied embedding / lm_head count once
            seen.add(p.data_ptr())
            total += p.numel()
    for module in model.modules():
        if hasattr(module, "qweight") and hasattr(module, "in_features"):
            total += module.in_features * module.out_features
            bias = getattr(module, "bias", None)
            if bias is not None and not isinstance(bias, torch.nn.Parameter):
                total += bias.numel()
    return total

