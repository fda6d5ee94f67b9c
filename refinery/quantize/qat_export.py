"""Export a KD-QAT student on exactly the grid it trained on, as a GPTQ checkpoint vLLM loads.

    refinery quantize configs/quickstart.yaml distill.qat.enabled=true quantize.method=qat_rtn

Reads `distill/adapter/` and `distill/qat.json` (bits, group size, symmetric, the dtype the
frozen weights trained in). Each decoder linear layer's W + B A * scaling is computed as the
training forward computed it (`qat.effective_weight`), rounded to the grid (`qat.quantize`) and
packed in GPTQ v1 layout (GPTQModel's saved checkpoints): `qweight` int32 (in / (32/bits), out),
`qzeros` int32 (groups, out / (32/bits)) holding zero - 1, `scales` float16 (groups, out),
`g_idx` int32 (in,) = column // group_size. No calibration: QAT already chose the weights.
Also writes `quantize/merged/` (the float QAT student), like the GPTQ path.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from refinery.core.config import ConfigError
from refinery.core.manifest import atomic_path, dir_bytes
from refinery.core.models import resolve_models
from refinery.core.stage import Context, Result
from refinery.quantize.calib import load_rows, split_texts
from refinery.quantize.config import QuantizeConfig
from refinery.quantize.load import measure_error
from refinery.quantize.merge import merge_lora
from refinery.quantize.shapes import in_layers, quantizable_widths, safetensors_bytes

log = logging.getLogger("refinery.quantize")
PACKABLE_BITS = (2, 4, 8)  # 32 / bits values per int32; 3-bit GPTQ packing spans words (not written here)


def read_spec(distill_dir: Path) -> dict:
    from refinery.train.qat import SPEC

    path = Path(distill_dir) / SPEC
    if not path.is_file():
        raise ConfigError(f"quantize.method: 'qat_rtn' needs a KD-QAT student but {path} is missing: run distill "
                          "with distill.qat.enabled=true, or use quantize.method=gptq")
    return json.loads(path.read_text())


def check_grid(cfg: QuantizeConfig, spec: dict) -> None:
    """The quantize section must name the grid the student trained on (one grid, stated once per stage)."""
    for key, want in (("bits", spec["bits"]), ("group_size", spec["group_size"]), ("sym", spec["symmetric"])):
        if getattr(cfg, key) != want:
            raise ConfigError(f"quantize.{key}: got {getattr(cfg, key)!r} but the QAT student trained with "
                              f"distill.qat grid {key}={want!r}; set quantize.{key}={want} (qat_rtn exports that grid)")
    if spec["bits"] not in PACKABLE_BITS:
        raise ConfigError(f"distill.qat.bits: {spec['bits']} cannot be exported by quantize.method=qat_rtn; "
                          f"train with one of {PACKABLE_BITS}")


def pack(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit ints along `dim` into int32 words, lowest bits first (GPTQ layout)."""
    per = 32 // bits
    x = x.to(torch.int64).movedim(dim, -1)
    if x.shape[-1] % per:
        raise ValueError(f"cannot pack {x.shape[-1]} values into {bits}-bit int32 words")
    x = x.reshape(*x.shape[:-1], x.shape[-1] // per, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (x << shifts).sum(-1) & 0xFFFFFFFF
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # same bits, signed
    return words.movedim(-1, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `pack` (int64 values)."""
    per = 32 // bits
    w = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    vals = (w[..., None] >> (torch.arange(per, dtype=torch.int64) * bits)) & (2 ** bits - 1)
    return vals.reshape(*w.shape[:-1], w.shape[-1] * per).movedim(-1, dim)


def gptq_tensors(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> dict:
    """qweight, qzeros, scales, g_idx of one layer from qat.quantize's (q, scale, zero) of a (out, in) W."""
    in_f = q.shape[1]
    g = in_f if group_size == -1 else group_size
    return {"qweight": pack(q.t(), bits, 0),
            "qzeros": pack((zero - 1).t(), bits, 1),  # (groups, out) like scales
            "scales": scale.t().half().contiguous(),  # exact: qat.quantize rounds scales to float16 already
            "g_idx": (torch.arange(in_f, dtype=torch.int32) // g).to(torch.int32)}


def quantization_config(spec: dict) -> dict:
    return {"bits": spec["bits"], "group_size": spec["group_size"], "desc_act": False, "sym": spec["symmetric"],
            "lm_head": False, "quant_method": "gptq", "method": "gptq", "format": "gptq",
            "checkpoint_format": "gptq", "pack_dtype": "int32",
            "meta": {"quantizer": ["refinery:qat_rtn"], "static_groups": False, "true_sequential": True}}


def export(student: str, adapter_dir: str | Path | None, out_dir: str | Path, spec: dict, dtype: str = "bfloat16",
           trust_remote_code: bool = False, tokenizer_from: str | None = None) -> dict:
    """Write the GPTQ checkpoint of base `student` + the QAT adapter at `out_dir` (atomically).
    adapter_dir None: `student` is itself the trained model (distill.qat.full_finetune's distill/model)."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.train.qat import (
        base_linear,
        effective_weight,
        quant_targets,
        quantize,
    )

    started = time.time()
    # LoRA: the frozen base in the dtype it trained in. Full fine-tuning: float32 holds both the trained
    # float32 linears and the distill.dtype rest exactly.
    load_dtype = getattr(torch, spec["dtype"] if adapter_dir else "float32")
    base = AutoModelForCausalLM.from_pretrained(student, dtype=load_dtype, trust_remote_code=trust_remote_code)
    model = (PeftModel.from_pretrained(base, str(adapter_dir)) if adapter_dir else base).eval()
    inner = model.get_base_model() if adapter_dir else model
    prefix = "base_model.model." if adapter_dir else ""
    targets = {name.removeprefix(prefix): m for name, m in quant_targets(model).items()}
    tensors = {}
    with torch.no_grad():
        for name, m in targets.items():
            q, scale, zero = quantize(effective_weight(m), spec["bits"], spec["group_size"], spec["symmetric"])
            for key, t in gptq_tensors(q, scale, zero, spec["bits"], spec["group_size"]).items():
                tensors[f"{name}.{key}"] = t
        tied = getattr(inner.config, "tie_word_embeddings", False)
        for key, t in inner.state_dict().items():
            if "lora_" in key or key.startswith(tuple(f"{n}." for n in targets)) or (tied and key == "lm_head.weight"):
                continue
            tensors[key] = t.to(getattr(torch, dtype)).contiguous()
        for name, m in targets.items():  # biases of quantized layers stay float16, as GPTQModel saves them
            if base_linear(m).bias is not None:
                tensors[f"{name}.bias"] = base_linear(m).bias.to(torch.float16).contiguous()
    config = inner.config
    config.quantization_config = quantization_config(spec)
    config.dtype = dtype
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        (tmp / "quantize_config.json").write_text(json.dumps(quantization_config(spec), indent=2) + "\n")
        AutoTokenizer.from_pretrained(tokenizer_from or student, trust_remote_code=trust_remote_code).save_pretrained(tmp)
        (tmp / "refinery_quantize.json").write_text(json.dumps({"method": "qat_rtn", "grid": spec,
                                                                "source": str(student),
                                                                "adapter": str(adapter_dir)}, indent=2) + "\n")
    widths = quantizable_widths(out_dir, trust_remote_code)
    return {"quantize_s": round(time.time() - started, 2), "bits": spec["bits"], "group_size": spec["group_size"],
            "sym": spec["symmetric"], "gptq_bytes": dir_bytes(out_dir),
            "quantized_layers_bytes": safetensors_bytes(out_dir, in_layers(widths))}


def trained_student(distill: Path, student: str, out_dir: Path, dtype: str, trust_remote_code: bool = False) -> Path:
    """The float trained student as an HF dir at `out_dir`: the LoRA adapter merged into `student`,
    or (distill.qat.full_finetune) distill/model/ re-saved in `dtype` with the student's tokenizer."""
    full = Path(distill) / "model"
    if not full.is_dir():
        return merge_lora(student, Path(distill) / "adapter", out_dir, dtype, trust_remote_code)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(full, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(student, trust_remote_code=trust_remote_code).save_pretrained(tmp)
    return Path(out_dir)


def run(ctx: Context, cfg: QuantizeConfig) -> Result:
    """The quantize stage for quantize.method=qat_rtn: merged float student + the grid's GPTQ checkpoint."""
    distill = ctx.stage_dir("distill")
    spec = read_spec(distill)
    check_grid(cfg, spec)
    _, held_out = split_texts(load_rows(ctx.stage_dir("generate") / "data.jsonl"), cfg.calibration_samples,
                              cfg.error_samples, ctx.seed)
    _, student = resolve_models(ctx.models)
    trust = ctx.models.trust_remote_code
    out = ctx.stage_dir("quantize")
    merged = trained_student(distill, student, out / "merged", cfg.merge_dtype, trust)
    full = distill / "model"
    if full.is_dir():
        stats = export(str(full), None, out / "gptq", spec, cfg.dtype, trust, tokenizer_from=student)
    else:
        stats = export(student, distill / "adapter", out / "gptq", spec, cfg.dtype, trust)
    error = measure_error(merged, out / "gptq", held_out, cfg.calibration_max_len, trust)
    merged_bytes = dir_bytes(merged)
    layers_fp = safetensors_bytes(merged, in_layers(quantizable_widths(merged, trust)))
    metrics = {**stats, **error, "method": "qat_rtn", "merged_bytes": merged_bytes,
               "ratio": round(merged_bytes / stats["gptq_bytes"], 3), "quantized_layers_bytes_merged": layers_fp,
               "quantized_layers_ratio": round(layers_fp / stats["quantized_layers_bytes"], 3)}
    log.info("quantize (qat_rtn): %.1f MB -> %.1f MB (x%.2f), KL %.4f vs the float QAT student", merged_bytes / 1e6,
             stats["gptq_bytes"] / 1e6, metrics["ratio"], error["kl_mean"])
    outputs = sorted(str(p.relative_to(out)) for d in (merged, out / "gptq") for p in d.rglob("*") if p.is_file())
    return Result(metrics=metrics, outputs=outputs)
