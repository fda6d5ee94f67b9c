"""quantize: config validation, group-size check on real shapes, data split, byte counts, input errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from refinery.core.config import ConfigError, InputError
from refinery.core.manifest import write_jsonl
from refinery.pipeline.config import load
from refinery.quantize.config import QuantizeConfig
from refinery.quantize.calib import load_rows, split_texts
from refinery.quantize.gptq import quant_device
from refinery.quantize.merge import check_adapter
from refinery.quantize.shapes import (check_group_size, in_layers, quantizable_widths, safetensors_bytes,
                                      valid_group_sizes)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override, message", [
    ("quantize.group_size=8", "quantize.group_size: got 8, expected -1 or an integer >= 16"),
    ("quantize.desc_act=true", "quantize.desc_act: got True, expected false when act_order is true"),
    ("quantize.group_size=-1", "quantize.act_order: got True, expected false when group_size is -1"),
    ("quantize.damp_percent=1.5", "quantize.damp_percent: got 1.5, expected a number in (0, 1)"),
    ("quantize.calibration_samples=0", "quantize.calibration_samples: got 0"),
    ("quantize.calibration_max_len=4", "quantize.calibration_max_len: got 4"),
    ("quantize.calibration_batch_size=0", "quantize.calibration_batch_size: got 0, expected an integer >= 1"),
    ("quantize.dtype=int8", "quantize.dtype: got 'int8'"),
    ("quantize.device=tpu", "quantize.device: got 'tpu'"),
])
def test_bad_quantize_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load(None, [override])
    assert message in str(e.value)


def test_valid_combinations_and_quickstart_section():
    assert load(None, ["quantize.act_order=false", "quantize.desc_act=true"]).quantize.desc_act is True
    assert load(None, ["quantize.act_order=false", "quantize.group_size=-1"]).quantize.group_size == -1
    q = load(ROOT / "configs/quickstart.yaml").quantize
    assert (q.bits, q.group_size, q.act_order, q.desc_act) == (4, 64, True, False)
    assert q.group_size in valid_group_sizes({"h": 576, "i": 1536})  # SmolLM2 widths


def test_group_size_check_on_real_smollm2_shapes(tiny_student):
    widths = quantizable_widths(tiny_student)
    # 2 decoder layers x (q, k, v, o, gate, up, down); the tied lm_head is not quantized.
    assert len(widths) == 14 and "lm_head" not in widths
    assert widths["model.layers.0.self_attn.q_proj"] == 576
    assert widths["model.layers.1.mlp.down_proj"] == 1536
    assert valid_group_sizes(widths) == [-1, 16, 32, 64]
    for ok in (-1, 32, 64):
        check_group_size(widths, ok)
    with pytest.raises(ConfigError) as e:
        check_group_size(widths, 128)
    msg = str(e.value)
    assert "quantize.group_size: 128 does not divide the input width 576" in msg
    assert "'model.layers.0.self_attn.q_proj'" in msg and "valid group sizes for this model: -1, 16, 32, 64" in msg
    with pytest.raises(ConfigError, match="input width 1536 of layer 'model.layers.0.mlp.down_proj'"):
        check_group_size({"model.layers.0.mlp.down_proj": 1536}, 1024)


def test_safetensors_bytes_counts_selected_tensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"model.layers.0.q.weight": torch.zeros(8, 16),
               "model.layers.0.q.scales": torch.zeros(4, dtype=torch.float16),
               "model.embed.weight": torch.zeros(10, 4, dtype=torch.bfloat16)}, str(tmp_path / "a.safetensors"))
    save_file({"model.layers.0.q.qweight": torch.zeros(2, 16, dtype=torch.int32)}, str(tmp_path / "b.safetensors"))
    assert safetensors_bytes(tmp_path) == 8 * 16 * 4 + 4 * 2 + 10 * 4 * 2 + 2 * 16 * 4
    assert safetensors_bytes(tmp_path, in_layers({"model.layers.0.q": 16})) == 8 * 16 * 4 + 4 * 2 + 2 * 16 * 4
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        safetensors_bytes(tmp_path / "empty")


def _rows(n):
    return [{"instruction": f"q{i}?", "input": "", "output": f"a{i}", "task": "siqa", "score": 7.0} for i in range(n)]


def test_split_texts_holds_out_rows_and_never_overlaps():
    calib, held = split_texts(_rows(40), n_calib=16, n_error=8, seed=0)
    assert (len(calib), len(held)) == (16, 8)
    assert not set(calib) & set(held)
    assert all(t.startswith("Question: q") and "\nAnswer: a" in t for t in calib + held)
    assert split_texts(_rows(40), 16, 8, seed=0) == (calib, held)
    assert split_texts(_rows(40), 16, 8, seed=1) != (calib, held)
    calib, held = split_texts(_rows(6), n_calib=128, n_error=8, seed=0)  # small data: a quarter held out
    assert (len(calib), len(held)) == (5, 1)


def test_load_rows_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `refinery generate` first"):
        load_rows(tmp_path / "data.jsonl")
    write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": "y"}, {"prompt": "no"}])
    with pytest.raises(InputError, match=r"bad.jsonl:2 lacks non-empty instruction, output"):
        load_rows(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "one.jsonl", _rows(1))
    with pytest.raises(InputError, match="has 1 rows; quantize needs at least 2"):
        load_rows(tmp_path / "one.jsonl")
    write_jsonl(tmp_path / "ok.jsonl", _rows(3))
    assert len(load_rows(tmp_path / "ok.jsonl")) == 3


def test_check_adapter_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `refinery distill` first"):
        check_adapter(tmp_path / "adapter")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        check_adapter(tmp_path / "adapter")


def test_cuda_device_without_cuda_is_a_config_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert quant_device(QuantizeConfig()) == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        quant_device(QuantizeConfig(device="cuda"))


def test_load_quantized_rejects_float_checkpoint(tiny_student):
    from refinery.quantize.load import load_quantized

    with pytest.raises(ValueError, match="is not a GPTQ checkpoint"):
        load_quantized(tiny_student)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_quantized(Path(tiny_student) / "nowhere")


def test_quantization_error_is_zero_for_identical_models(tiny_student):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.quantize.load import quantization_error

    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_student)
    texts = ["Question: Is ice cold?\nAnswer: yes", "Question: Where do fish live?\nAnswer: in water"]
    err = quantization_error(model, model, tok, texts)
    assert err["kl_mean"] == pytest.approx(0.0, abs=1e-6) and err["ppl_delta"] == pytest.approx(0.0, abs=1e-6)
    assert err["error_tokens"] == sum(len(tok(t)["input_ids"]) for t in texts)
    with pytest.raises(ValueError, match="at least one text"):
        quantization_error(model, model, tok, [])
