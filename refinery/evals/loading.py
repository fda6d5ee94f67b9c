"""Load a model for evaluation: fp checkpoints as stored, GPTQ checkpoints through transformers.

A GPTQ dir (config.json with `quantization_config`) loads through `refinery.quantize.load.load_quantized`:
transformers hands it to optimum + GPTQModel, which pick a CPU kernel (TorchAtenLinear) without a GPU.
"""
from __future__ import annotations

import json
from pathlib import Path

from refinery.core.models import resolve_models
from refinery.core.stage import Context

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # GPU path: one line, nothing else differs


def is_quantized(path: str | Path) -> bool:
    """True when the checkpoint at `path` declares a quantization_config (GPTQ, ...)."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "quantization_config" in json.loads(cfg.read_text())


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 on GPU and on CPUs with native bf16 (AVX512-BF16/AMX), else float32.

    Measured here (AVX512-BF16, 2 cores): a bf16 forward of SmolLM2-135M runs ~1.5-2x faster
    than fp32; on CPUs without native bf16 it is emulated and slower, hence the check.
    """
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"evaluate.dtype: got {dtype!r}, expected one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    if device == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bfloat16"
    return "float32"


def load_model(path: str, dtype: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode on the default device, computing in `resolve_dtype(dtype)`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _device()
    dtype = resolve_dtype(dtype, device)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if is_quantized(path):
            from refinery.quantize.load import load_quantized

            # Quantized layers are placed (and their kernel chosen) at load time.
            model = load_quantized(path, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                         trust_remote_code=trust_remote_code).to(device)
    except (OSError, ValueError, ImportError) as e:
        raise RuntimeError(f"evaluate: could not load the model at {path!r}: {type(e).__name__}: {e}") from e
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


def model_paths(ctx: Context, names: list[str]) -> dict[str, str]:
    """Where each requested model lives; a missing input names the stage that makes it."""
    quant_dir = ctx.stage_dir("quantize")
    paths = {"student": str(quant_dir / "merged"), "student_quant": str(quant_dir / "gptq")}
    for name in ("student", "student_quant"):
        if name in names and not (Path(paths[name]) / "config.json").is_file():
            raise FileNotFoundError(
                f"evaluate: model {name!r} needs {paths[name]}/ (an HF model dir with config.json), "
                "which is missing: run the quantize stage first (`refinery quantize CONFIG`), or drop "
                f"{name!r} from evaluate.models")
    if "teacher" in names or "student_base" in names:
        paths["teacher"], paths["student_base"] = resolve_models(ctx.models)
    return {name: paths[name] for name in names}
