"""Load a GPTQ checkpoint with transformers, and measure what quantization cost.

On CPU, transformers loads GPTQ checkpoints through optimum's GPTQ quantizer, which hands
the packed layers to GPTQModel's CPU kernel (TorchAtenLinear). Both packages must be
installed; no CUDA is needed.
"""
from __future__ import annotations

import gc
import json
import math
from importlib import util
from pathlib import Path

from refinery.core import proc


def load_quantized(path: str | Path, dtype: str | None = None, trust_remote_code: bool = False,
                   device: str = "cpu"):
    """A GPTQ checkpoint (as written by the quantize stage) as a transformers model in eval mode.

    `dtype` defaults to the checkpoint's own (`bfloat16` for the stage's default); the packed
    4-bit weights stay packed and are dequantized by GPTQModel's kernel on the fly.
    """
    proc.quiet_logbar()  # transformers imports gptqmodel to load it: its banner off unless -v
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json: pass a GPTQ checkpoint dir (<run_dir>/quantize/gptq)")
    qcfg = json.loads(config.read_text()).get("quantization_config") or {}
    if qcfg.get("quant_method") != "gptq":
        raise ValueError(f"{path} is not a GPTQ checkpoint (quantization_config.quant_method="
                         f"{qcfg.get('quant_method')!r}); load float checkpoints with AutoModelForCausalLM")
    missing = [name for name in ("optimum", "gptqmodel") if util.find_spec(name) is None]
    if missing:
        raise ImportError(f"loading GPTQ checkpoints with transformers needs {' and '.join(missing)}: "
                          "pip install optimum gptqmodel==7.6.0 torch==2.13.0")
    kwargs = {"device_map": device, "trust_remote_code": trust_remote_code}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval()


def quantization_error(ref_model, quant_model, tokenizer, texts: list[str], max_len: int = 256) -> dict:
    """Mean per-token KL(ref || quant) and perplexities of both models on `texts`.

    Both take the same tokens; logits are compared in float32. Perplexity is of each text's
    own next tokens, so `ppl_delta` > 0 means the quantized model predicts the text worse.
    """
    import torch
    import torch.nn.functional as F

    if not texts:
        raise ValueError("quantization_error needs at least one text")
    kl_sum, nll_ref, nll_q, n_tok, n_pred = 0.0, 0.0, 0.0, 0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_len)["input_ids"]
            if ids.shape[1] < 2:
                continue
            ref = F.log_softmax(ref_model(input_ids=ids).logits.float()[0], -1)
            q = F.log_softmax(quant_model(input_ids=ids.to(quant_model.device)).logits.float()[0].cpu(), -1)
            kl_sum += (ref.exp() * (ref - q)).sum().item()
            target = ids[0, 1:]
            nll_ref -= ref[:-1].gather(-1, target[:, None]).sum().item()
            nll_q -= q[:-1].gather(-1, target[:, None]).sum().item()
            n_tok += ids.shape[1]
            n_pred += ids.shape[1] - 1
    if n_tok == 0:
        raise ValueError("quantization_error: every text was shorter than 2 tokens")
    ppl_ref, ppl_q = math.exp(nll_ref / n_pred), math.exp(nll_q / n_pred)
    return {"kl_mean": kl_sum / n_tok, "ppl_merged": ppl_ref, "ppl_quant": ppl_q,
            "ppl_delta": ppl_q - ppl_ref, "error_tokens": n_tok}


def measure_error(merged_dir: str | Path, gptq_dir: str | Path, texts: list[str], max_len: int,
                  trust_remote_code: bool = False) -> dict:
    """Quantization error of `gptq_dir` against the float `merged_dir` on held-out texts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=trust_remote_code)
    ref = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32,
                                               trust_remote_code=trust_remote_code).eval()
    quant = load_quantized(gptq_dir, trust_remote_code=trust_remote_code)
    try:
        return quantization_error(ref, quant, tokenizer, texts, max_len)
    finally:
        del ref, quant
        gc.collect()
