"""GPTQ on CUDA (quantize.device=cuda): the only GPU-specific path of the quantize stage."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_quantize_model_on_cuda_loads_back_close_to_float(tmp_path, tiny_student):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.quantize.config import QuantizeConfig
    from refinery.quantize.gptq import quant_device, quantize_model
    from refinery.quantize.load import load_quantized, quantization_error

    cfg = QuantizeConfig(device="cuda", calibration_samples=8, calibration_max_len=64)
    assert quant_device(cfg) == "cuda:0"
    texts = [f"Question: What does person {i} do after dropping a glass?\nAnswer: They clean it up." for i in range(8)]
    stats = quantize_model(tiny_student, tmp_path / "gptq", cfg, texts)
    assert stats["calibration_samples"] == 8
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["bits"] == 4
    tok = AutoTokenizer.from_pretrained(tiny_student)
    ref = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32).eval()
    quant = load_quantized(tmp_path / "gptq", device="cuda")
    err = quantization_error(ref, quant, tok, texts[:2])
    assert 0 < err["kl_mean"] < 2.0
