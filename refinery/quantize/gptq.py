"""The `quantize` stage: merge the distilled LoRA into the student, then GPTQ W{bits}A16.

    refinery quantize configs/quickstart.yaml [quantize.group_size=32 ...]

Reads `<run_dir>/distill/adapter/` and `<run_dir>/generate/data.jsonl`; writes
`<run_dir>/quantize/merged/` (float HF checkpoint) and `<run_dir>/quantize/gptq/` (GPTQ
checkpoint that transformers and vLLM load). `quantize_model` works on any HF checkpoint,
for GPTQ-only baselines.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import time
from pathlib import Path

from refinery.core import proc
from refinery.core.config import ConfigError, to_dict
from refinery.core.manifest import atomic_path, dir_bytes
from refinery.core.models import resolve_models
from refinery.core.stage import Context, Result
from refinery.quantize.calib import load_rows, split_texts
from refinery.quantize.config import QuantizeConfig
from refinery.quantize.load import measure_error
from refinery.quantize.merge import check_adapter, merge_lora
from refinery.quantize.shapes import check_group_size, in_layers, quantizable_widths, safetensors_bytes

log = logging.getLogger("refinery.quantize")
RECIPE = "refinery_quantize.json"


def run(ctx: Context, cfg: QuantizeConfig) -> Result:
    """Merge `distill/adapter` into the student base, GPTQ it, and measure size and error."""
    if cfg.method == "qat_rtn":  # the KD-QAT student's own grid, no calibration
        from refinery.quantize import qat_export

        return qat_export.run(ctx, cfg)
    adapter = ctx.stage_dir("distill") / "adapter"
    full = (ctx.stage_dir("distill") / "model").is_dir()  # distill.qat.full_finetune: no adapter
    if not full:
        check_adapter(adapter)
    if (ctx.stage_dir("distill") / "qat.json").is_file():
        log.warning("quantize: the student was trained with distill.qat but quantize.method=gptq recomputes the "
                    "grid; quantize.method=qat_rtn exports the grid it trained on")
    calib, held_out = split_texts(load_rows(ctx.stage_dir("generate") / "data.jsonl"),
                                  cfg.calibration_samples, cfg.error_samples, ctx.seed)
    _, student = resolve_models(ctx.models)
    trust = ctx.models.trust_remote_code
    widths = quantizable_widths(student, trust)
    check_group_size(widths, cfg.group_size)  # fail before the merge, not after it
    out = ctx.stage_dir("quantize")
    if full:
        from refinery.quantize.qat_export import trained_student

        merged = trained_student(ctx.stage_dir("distill"), student, out / "merged", cfg.merge_dtype, trust)
    else:
        merged = merge_lora(student, adapter, out / "merged", cfg.merge_dtype, trust)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged, trust_remote_code=trust)
    q = quantize_merged(merged, out / "gptq", cfg, tokenize_calibration(tokenizer, calib, cfg.calibration_max_len),
                        tokenizer, held_out, trust)
    error = q.pop("error")
    merged_bytes, gptq_bytes = q.pop("merged_bytes"), q["gptq_bytes"]
    stats = {**q, "quantized_layers_bytes": safetensors_bytes(out / "gptq", in_layers(widths))}
    layers_fp = safetensors_bytes(merged, in_layers(widths))
    metrics = {
        **stats, **error,
        "merged_bytes": merged_bytes,
        "gptq_bytes": gptq_bytes,
        "ratio": round(merged_bytes / gptq_bytes, 3),
        "quantized_layers_bytes_merged": layers_fp,
        "quantized_layers_ratio": round(layers_fp / stats["quantized_layers_bytes"], 3),
    }
    log.info("quantize: %.1f MB -> %.1f MB (x%.2f), KL %.4f, ppl %.4g -> %.4g, %.1f s", merged_bytes / 1e6,
             gptq_bytes / 1e6, metrics["ratio"], error["kl_mean"], error["ppl_merged"], error["ppl_quant"],
             stats["quantize_s"])
    outputs = sorted(str(p.relative_to(out)) for d in (merged, out / "gptq") for p in d.rglob("*") if p.is_file())
    return Result(metrics=metrics, outputs=outputs)


def quantize_merged(merged: str | Path, gptq_dir: str | Path, cfg: QuantizeConfig, calib: list[dict], tokenizer,
                    held_out: list[str], trust_remote_code: bool = False, source: str | None = None) -> dict:
    """GPTQ (or RTN) the float checkpoint `merged` into `gptq_dir` and measure its error against `merged`
    on the held-out texts: the one way a checkpoint is quantized, by the stage (one run) and by
    quantize/batch.py (many). Returns `quantize_tokenized`'s stats, `error` (`measure_error`'s) and
    `merged_bytes`."""
    stats = quantize_tokenized(merged, gptq_dir, cfg, calib, tokenizer, trust_remote_code, source=source)
    error = measure_error(merged, gptq_dir, held_out, cfg.calibration_max_len, trust_remote_code)
    return {**stats, "error": error, "merged_bytes": dir_bytes(merged)}


def quantize_model(model_dir: str | Path, out_dir: str | Path, cfg: QuantizeConfig, calibration_texts: list[str],
                   trust_remote_code: bool = False) -> dict:
    """GPTQ-quantize the HF checkpoint at `model_dir` into `out_dir` (written atomically).

    Checks the group size against every quantized layer first. Returns quantize_s, bits,
    group_size, calibration_samples, calibration_tokens, gptq_bytes and
    quantized_layers_bytes (bytes of the packed layers in the output).
    """
    widths = quantizable_widths(model_dir, trust_remote_code)
    check_group_size(widths, cfg.group_size)
    if not calibration_texts:
        raise ValueError("quantize_model needs at least one calibration text")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    calib = tokenize_calibration(tokenizer, calibration_texts, cfg.calibration_max_len)
    stats = quantize_tokenized(model_dir, out_dir, cfg, calib, tokenizer, trust_remote_code)
    return {**stats, "quantized_layers_bytes": safetensors_bytes(out_dir, in_layers(widths))}


def tokenize_calibration(tokenizer, texts: list[str], max_len: int) -> list[dict]:
    """Calibration texts as GPTQModel's input: [{input_ids, attention_mask}], truncated to `max_len`."""
    calib = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=max_len)
        calib.append({"input_ids": list(enc["input_ids"]), "attention_mask": list(enc["attention_mask"])})
    return calib


def quantize_tokenized(model_dir: str | Path, out_dir: str | Path, cfg: QuantizeConfig, calib: list[dict],
                       tokenizer, trust_remote_code: bool = False, source: str | None = None) -> dict:
    """GPTQ (or RTN, `cfg.method`) of `model_dir` into `out_dir` (atomic) from tokenized calibration data.

    The group size is not checked here (callers check it before any work). `source` is recorded in
    the output's recipe instead of `model_dir` (which may be a temp dir). Returns quantize_s, bits,
    group_size, calibration_samples, calibration_tokens and gptq_bytes.
    """
    _gptq_env()
    import torch
    from gptqmodel import GPTQModel

    _redirect_gptq_logs(Path(out_dir).parent / "logs")
    started = time.time()
    model = GPTQModel.load(str(model_dir), gptq_config(cfg), dtype=getattr(torch, cfg.dtype),
                           trust_remote_code=trust_remote_code)
    if cfg.method == "rtn":  # weight-only: GPTQModel ignores (and warns about) calibration data
        model.quantize(None, tokenizer=tokenizer)
        calib = []
    else:
        # min_length=1: GPTQModel silently drops texts under 10 tokens by default; short answers are real data.
        model.quantize(calib, tokenizer=tokenizer, batch_size=cfg.calibration_batch_size,
                       calibration_data_min_length=1)
    out_dir = Path(out_dir)
    recipe = {"config": to_dict(cfg), "source": source or str(model_dir), "calibration_samples": len(calib),
              "calibration_tokens": sum(len(c["input_ids"]) for c in calib)}
    with atomic_path(out_dir) as tmp:
        # GPTQModel's save prints the saved dir's file list and configs to stdout: shown with -v only
        with contextlib.nullcontext() if proc.verbose() else contextlib.redirect_stdout(io.StringIO()):
            model.save(str(tmp))
        (tmp / RECIPE).write_text(json.dumps(recipe, indent=2) + "\n")
    quantize_s = round(time.time() - started, 2)
    del model
    gc.collect()
    return {"quantize_s": quantize_s, "bits": cfg.bits, "group_size": cfg.group_size,
            "calibration_samples": recipe["calibration_samples"],
            "calibration_tokens": recipe["calibration_tokens"],
            "gptq_bytes": dir_bytes(out_dir)}


def _redirect_gptq_logs(log_dir: Path) -> None:
    """GPTQModel writes per-layer logs to ./logs of the current directory; keep them in the stage dir."""
    try:
        from gptqmodel.looper import loop_processor
    except ImportError:  # layout changed in another GPTQModel release: logs stay in ./logs
        return
    loop_processor._PROJECT_LOG_DIR = log_dir


def gptq_config(cfg: QuantizeConfig):
    """GPTQModel's config for our settings (desc_act stays false unless asked: vLLM refuses it)."""
    from gptqmodel import QuantizeConfig as GPTQModelConfig
    from gptqmodel.quantization.config import RTNConfig

    if cfg.method == "rtn":  # round-to-nearest on the same grid, written in the same GPTQ format
        return RTNConfig(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, desc_act=False,
                         device=quant_device(cfg))
    return GPTQModelConfig(bits=cfg.bits, group_size=cfg.group_size, desc_act=cfg.desc_act,
                           act_group_aware=cfg.act_order, sym=cfg.sym, damp_percent=cfg.damp_percent,
                           device=quant_device(cfg))


def quant_device(cfg: QuantizeConfig) -> str:
    """`cuda:0` or `cpu`: the only GPU-specific choice of this stage."""
    import torch

    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("quantize.device: got 'cuda' but no CUDA device is visible; use auto or cpu")
        return "cuda:0"
    return "cpu"


def _gptq_env() -> None:
    # GPTQModel's CPU pool defaults to (cores + 1) // 2 workers: one on 2 cores, where quantization
    # stalls; REFERENCE.md measured it working with 2. Read at import, so set before importing it.
    default = max(2, ((os.cpu_count() or 1) + 1) // 2)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(default))
    proc.quiet_logbar()
