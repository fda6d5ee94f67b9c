"""Fold a LoRA adapter into the student's float weights.

GPTQ must see the merged weights: quantizing the base and keeping LoRA in float on top
loses the adapter's effect on the quantized layers and cannot be served as plain GPTQ
(llm-compressor #1995, transformers #31293).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from refinery.core.manifest import atomic_path
from refinery.core.weights import check_weights

log = logging.getLogger("refinery.quantize")


def check_adapter(adapter_dir: str | Path) -> dict:
    """The adapter's config; a clear error if `adapter_dir` is not a saved PEFT adapter."""
    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"no LoRA adapter at {adapter_dir} (adapter_config.json missing): run `refinery distill` first")
    weights = [p for p in ("adapter_model.safetensors", "adapter_model.bin") if (adapter_dir / p).is_file()]
    if not weights:
        raise FileNotFoundError(
            f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors: the distill stage did not "
            "finish; re-run `refinery distill`")
    check_weights(adapter_dir, "LoRA adapter")
    return json.loads(cfg_file.read_text())


def merge_lora(base_path: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32",
               trust_remote_code: bool = False) -> Path:
    """Load `base_path`, apply the PEFT adapter in `adapter_dir`, merge it and save an HF dir at `out_dir`.

    The output (safetensors + config + tokenizer) appears atomically. Returns `out_dir`.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_cfg = check_adapter(adapter_dir)
    recorded = adapter_cfg.get("base_model_name_or_path")
    if recorded and Path(recorded).resolve() != Path(base_path).resolve():
        # Not fatal: the same base may live at another path; PEFT raises on a real shape mismatch.
        log.warning("adapter was trained on %s, merging into %s", recorded, base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype),
                                                trust_remote_code=trust_remote_code)
    try:
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"the LoRA adapter in {adapter_dir} does not fit the student base {base_path}: {e}. "
                         "Re-run `refinery distill` with the same models section") from e
    merged = peft_model.merge_and_unload()
    tok_src = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base_path
    tokenizer = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=trust_remote_code)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    log.info("merged %s into %s -> %s", adapter_dir, base_path, out_dir)
    return out_dir
