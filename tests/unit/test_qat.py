"""KD-QAT building blocks on tiny random Llamas: the grid, the STE, the LoRA fake-quant forward,
freezing, packing, config errors and stage hashes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refinery.core.config import ConfigError
from refinery.train import qat
from refinery.train.config import QatConfig

GRIDS = [(4, 16, True), (4, 16, False), (3, 32, True), (2, -1, False), (8, 32, True), (8, -1, False)]


def _reference(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Dequantized RTN weights, one group at a time in float64 (independent of qat.quantize)."""
    out = torch.empty_like(w, dtype=torch.float64)
    g = w.shape[1] if group_size == -1 else group_size
    qmax = 2 ** bits - 1
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], g):
            x = w[r, c:c + g].double()
            if symmetric:
                zero, scale = 2 ** (bits - 1), float(x.abs().max()) / (2 ** (bits - 1) - 1)
            else:
                lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
                scale = (hi - lo) / qmax
                if -lo < 0.5 * scale:  # zero would be 0, which GPTQ v1 cannot store: range [-scale, hi]
                    scale = hi / (qmax - 1)
            scale = float(torch.tensor(max(scale, qat._FP16_TINY), dtype=torch.float32).half())
            if not symmetric:
                zero = min(max(round(-lo / scale), 1), qmax)
            q = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
            out[r, c:c + g] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits,group_size,symmetric", GRIDS)
def test_grid_matches_reference_and_is_integer(bits, group_size, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(12, 64) * 0.05
    w[0, :16] += 0.3  # a group with a large positive outlier (asymmetric zero near the bottom)
    q, scale, zero = qat.quantize(w, bits, group_size, symmetric)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 2 ** bits - 1
    assert torch.equal(scale, scale.half().float())  # the grid a float16 checkpoint stores exactly
    if symmetric:
        assert bool((zero == 2 ** (bits - 1)).all())
    else:
        assert int(zero.min()) >= 1  # GPTQ v1 stores zero - 1
    wq = qat.dequantize(q, scale, zero, group_size)
    torch.testing.assert_close(wq.double(), _reference(w, bits, group_size, symmetric), rtol=0, atol=1e-7)
    step = scale.repeat_interleave(64 if group_size == -1 else group_size, 1)
    assert float(((wq - w).abs() / step).max()) <= 0.5 + 1e-5  # nothing clipped: within half a step


def test_ste_gradient_is_identity():
    torch.manual_seed(0)
    w = (torch.randn(8, 32) * 0.1).requires_grad_()
    c = torch.randn(8, 32)
    (qat.fake_quant(w, 4, 16) * c).sum().backward()
    assert torch.equal(w.grad, c)
    # through a linear: dL/dW = r^T x, computed as if the forward had used W itself
    w.grad = None
    x, r = torch.randn(5, 32), torch.randn(5, 8)
    (torch.nn.functional.linear(x, qat.fake_quant(w, 4, 16)) * r).sum().backward()
    torch.testing.assert_close(w.grad, r.T @ x)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _lora(model, targets):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return peft_model


def test_lora_forward_is_matmul_with_dequantized_sum():
    model = _lora(_tiny_llama(), ["q_proj", "up_proj"])
    state = qat.attach(model, QatConfig(enabled=True, bits=4, group_size=16))
    assert len(state.modules) == 14  # 7 projections x 2 layers, LoRA or not
    layer = model.base_model.model.model.layers[0]
    x = torch.randn(3, 5, 32)
    for m in (layer.self_attn.q_proj, layer.mlp.up_proj, layer.self_attn.v_proj):
        a = m.lora_A["default"].weight if hasattr(m, "lora_A") else 0
        b = m.lora_B["default"].weight if hasattr(m, "lora_B") else 0
        s = m.scaling["default"] if hasattr(m, "scaling") else 0
        w = qat.base_linear(m).weight + (b @ a) * s if hasattr(m, "lora_A") else m.weight
        wq = qat.dequantize(*qat.quantize(w, 4, 16), 16)
        torch.testing.assert_close(m(x), x @ wq.T, rtol=0, atol=1e-6)
        assert not torch.allclose(m(x), x @ w.T, atol=1e-4)  # it does quantize


def test_frozen_projections_get_no_update():
    from refinery.train.config import OptimConfig
    from refinery.train.optim import build_optimizer

    freeze = ["o_proj", "v_proj"]
    targets = [p for p in qat.PROJECTIONS if p not in freeze]  # what the trainer gives LoRA under freeze
    model = _lora(_tiny_llama(), targets)
    state = qat.attach(model, QatConfig(enabled=True, group_size=16, freeze=freeze))
    before = {n: qat.effective_weight(m).detach().clone() for n, m in state.modules.items()}
    opt = build_optimizer(model, OptimConfig(lr=0.05))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    ids = torch.randint(0, 64, (2, 12))
    for _ in range(3):
        state.recording = True
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        rows = state.rows(1)
    for name, m in state.modules.items():
        changed = not torch.equal(before[name], qat.effective_weight(m).detach())
        frozen = name.rsplit(".", 1)[-1] in freeze
        assert changed != frozen, name
        if frozen:  # nothing of it is trainable or reaches the optimizer
            assert not any(p.requires_grad or id(p) in in_opt for p in m.parameters()), name
    by_proj = {r["proj"]: r["grad_norm"] for r in rows}
    assert all(by_proj[p] and by_proj[p] > 0 for p in targets)  # the STE gradient reached each trained one
    assert all(0 < r["quant_err"] < 0.5 for r in rows)


def test_frozen_projection_with_lora_is_refused():
    model = _lora(_tiny_llama(), ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="distill.qat.freeze"):
        qat.attach(model, QatConfig(enabled=True, group_size=16, freeze=["v_proj"]))


def test_group_size_must_divide_width():
    with pytest.raises(ValueError, match="distill.qat.group_size"):
        qat.attach(_tiny_llama(), QatConfig(enabled=True, group_size=24))


def test_pack_roundtrip_and_gptq_layout():
    from refinery.quantize.qat_export import gptq_tensors, pack, unpack

    for bits in (2, 4, 8):
        x = torch.randint(0, 2 ** bits, (64, 48))
        assert torch.equal(unpack(pack(x, bits, 0), bits, 0), x)
        assert torch.equal(unpack(pack(x, bits, 1), bits, 1), x)
    # symmetric 4-bit zeros (8) are stored as 7 in every nibble, as GPTQModel writes them
    q, scale, zero = qat.quantize(torch.randn(16, 64), 4, 32, True)
    t = gptq_tensors(q, scale, zero, 4, 32)
    assert t["qweight"].shape == (8, 16) and t["qzeros"].shape == (2, 2) and t["scales"].shape == (2, 16)
    assert bool((t["qzeros"] == 0x77777777).all()) and t["scales"].dtype == torch.float16
    assert t["g_idx"].tolist() == [i // 32 for i in range(64)]


@pytest.mark.parametrize("override,field", [
    ("distill.qat.bits=1", "distill.qat.bits"),
    ("distill.qat.group_size=0", "distill.qat.group_size"),
    ("distill.qat.freeze=[x_proj]", "distill.qat.freeze"),
    ("distill.qat.diag_every=-1", "distill.qat.diag_every"),
])
def test_bad_values_name_the_field(override, field):
    from refinery.pipeline.config import load

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load(None, [override])


def test_qat_constraints_name_the_field():
    from refinery.pipeline.config import load

    with pytest.raises(ConfigError, match=r"distill\.lora\.dropout"):
        load(None, ["distill.qat.enabled=true", "distill.lora.dropout=0.1"])
    with pytest.raises(ConfigError, match=r"distill\.qat\.freeze"):
        load(None, ["distill.qat.enabled=true", "distill.lora.targets=[o_proj]", "distill.qat.freeze=[o_proj]"])
    with pytest.raises(ConfigError, match=r"distill\.qat\.full_finetune"):
        load(None, ["distill.qat.enabled=true", "distill.qat.full_finetune=true", "distill.parallel.strategy=deepspeed"])
    with pytest.raises(ConfigError, match=r"distill\.qat\.freeze"):
        load(None, ["distill.qat.enabled=true", "distill.qat.full_finetune=true", "distill.qat.freeze=[" +
                    ",".join(qat.PROJECTIONS) + "]"])
    with pytest.raises(ConfigError, match=r"distill\.qat\.enabled"):
        load(None, ["distill.qat.enabled=true", "distill.parallel.strategy=deepspeed", "distill.parallel.zero_stage=3"])


def test_stage_hashes():
    from refinery.core.config import config_hash, to_dict
    from refinery.core.runner import identity as stage_identity
    from refinery.pipeline.config import load
    from refinery.pipeline.stages import BY_NAME

    yaml_path = Path(__file__).parents[2] / "configs" / "quickstart.yaml"

    def h(*over):
        return stage_identity(load(yaml_path, list(over)), BY_NAME["distill"])[1]

    plain = load(yaml_path)
    old = {k: v for k, v in to_dict(plain.distill).items() if k not in ("parallel", "qat")}
    before_qat = config_hash({"seed": plain.seed, "models": to_dict(plain.models), "distill": old})
    assert h() == before_qat  # a run made before distill.qat existed is still complete
    assert h("distill.qat.diag_every=5") == h()  # disabled settings do not matter
    qat_h, ov_h = h("distill.qat.enabled=true"), h("distill.qat.enabled=true", "distill.qat.freeze=[o_proj,v_proj]")
    assert len({h(), qat_h, ov_h}) == 3


def test_full_finetune_trains_linears_in_float32():
    model = qat.prepare_full_finetune(_tiny_llama().to(torch.bfloat16), QatConfig(enabled=True, freeze=["o_proj"]))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 12 and all(p.dtype == torch.float32 for p in trainable.values())
    assert not any("o_proj" in n or "embed" in n or "norm" in n for n in trainable)
