"""Our Muon against torch.optim.Muon, the orthogonalization itself, and the param split."""
from __future__ import annotations

import math

import pytest
import torch

from refinery.train.config import OptimConfig
from refinery.train.muon import Muon, newton_schulz, orthogonalize
from refinery.train.optim import build_optimizer, lr_lambda, split_params


def _run_pair(shape, ours_kw, torch_kw, steps=6, seed=0):
    """Same init and same gradient sequence into both optimizers; return both final params."""
    g = torch.Generator().manual_seed(seed)
    init = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) for _ in range(steps)]
    a = torch.nn.Parameter(init.clone())
    b = torch.nn.Parameter(init.clone())
    ours = Muon([a], **ours_kw)
    ref = torch.optim.Muon([b], **torch_kw)
    for grad in grads:
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    return init, a.detach(), b.detach()


@pytest.mark.parametrize("shape", [(48, 12), (12, 48)], ids=["tall", "wide"])
@pytest.mark.parametrize("rule", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon(shape, rule, nesterov):
    kw = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=0.1, ns_steps=5)
    init, ours, ref = _run_pair(shape, {**kw, "lr_scale": rule}, {**kw, "adjust_lr_fn": rule})
    moved = (ref - init).abs().max().item()
    assert moved > 0.01  # the comparison is about a real update, not two untouched tensors
    # Both run Newton-Schulz in bf16 (relative precision ~4e-3); allow that on the update.
    assert (ours - ref).abs().max().item() < 5e-3 * moved


def test_lr_scale_none_is_unscaled():
    """`none` on a tall matrix = torch's `original` with lr divided by sqrt(rows/cols)."""
    rows, cols = 48, 12
    kw = dict(momentum=0.95, nesterov=True, weight_decay=0.0)
    init, ours, _ = _run_pair((rows, cols), {**kw, "lr": 0.02, "lr_scale": "none"}, {**kw, "lr": 0.02})
    _, _, ref = _run_pair((rows, cols), {**kw, "lr": 0.02, "lr_scale": "none"},
                          {**kw, "lr": 0.02 / math.sqrt(rows / cols), "adjust_lr_fn": "original"})
    assert torch.allclose(ours, ref, atol=1e-4)


def test_lr_scale_values():
    from refinery.train.muon import lr_scale

    assert lr_scale("original", (576, 16)) == pytest.approx(6.0)  # LoRA B: sqrt(576/16)
    assert lr_scale("original", (16, 576)) == 1.0  # LoRA A
    assert lr_scale("match_rms_adamw", (16, 576)) == pytest.approx(0.2 * 24)
    assert lr_scale("none", (576, 16)) == 1.0
    with pytest.raises(ValueError, match="lr_scale"):
        lr_scale("sqrt", (2, 2))


@pytest.mark.parametrize("shape", [(64, 16), (16, 64)])
def test_orthogonalized_singular_values_near_one(shape):
    g = torch.Generator().manual_seed(1)
    # Ill-conditioned input: singular values spread over two orders of magnitude.
    u, _ = torch.linalg.qr(torch.randn(shape[0], 16, generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], 16, generator=g))
    s_in = torch.logspace(0, -2, 16)
    x = (u * s_in) @ v.T
    out = newton_schulz(x).float()
    assert out.shape == x.shape
    s_out = torch.linalg.svdvals(out)
    assert s_in.max() / s_in.min() > 50
    # 5 quintic steps map every s in [s_max/100, s_max] into ~[0.68, 1.13] (measured), not exactly 1.
    assert s_out.min() > 0.65 and s_out.max() < 1.2, s_out
    # The direction is U V^T: cosine with the exact polar factor is high.
    polar = u @ v.T
    cos = (out * polar).sum() / (out.norm() * polar.norm())
    assert cos > 0.97
    # The list form is the same computation, one matrix at a time.
    assert torch.equal(orthogonalize([x])[0], newton_schulz(x))


def test_rejects_non_matrix_params():
    with pytest.raises(ValueError, match="2-D.*use_muon=False"):
        Muon([torch.nn.Parameter(torch.zeros(8))])
    with pytest.raises(ValueError, match="lr_scale"):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], lr_scale="bogus")
    Muon([{"params": [torch.nn.Parameter(torch.zeros(8))], "use_muon": False}])  # AdamW group: fine


def test_adamw_group_matches_torch_adamw():
    g = torch.Generator().manual_seed(2)
    init = torch.randn(10, generator=g)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours = Muon([{"params": [a], "use_muon": False}], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for _ in range(5):
        grad = torch.randn(10, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    assert (a - init).abs().max() > 0.03
    assert torch.allclose(a, b, atol=1e-6)


def test_lr_schedule():
    assert lr_lambda(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_lambda(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_lambda(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_lambda(55, 100, 10, "cosine") == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_lambda(100, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_lambda(55, 100, 10, "linear") == pytest.approx(0.55)
    assert lr_lambda(80, 100, 0, "constant") == 1.0


def test_build_optimizer_split_on_peft_lora(tiny_student):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    norm = model.base_model.model.model.norm.weight
    norm.requires_grad_(True)  # a trainable 1-D param must land in AdamW
    muon, adamw = split_params(model)
    n_layers = base.config.num_hidden_layers
    assert len(muon) == 2 * 2 * n_layers  # (A, B) x (q, v) x layers
    assert all(("lora_A" in n or "lora_B" in n) and p.ndim == 2 for n, p in muon)
    assert [n for n, _ in adamw] == ["base_model.model.model.norm.weight"]

    opt = build_optimizer(model, OptimConfig(lr=0.02, adamw_lr=1e-3))
    assert isinstance(opt, Muon)
    groups = {g["use_muon"]: g for g in opt.param_groups}
    assert groups[True]["lr"] == 0.02 and len(groups[True]["params"]) == len(muon)
    assert groups[False]["lr"] == 1e-3 and groups[False]["params"] == [norm]

    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model(input_ids=ids, labels=ids).loss.backward()
    lora_b = dict(muon)[next(n for n, _ in muon if "lora_B" in n)]
    assert lora_b.abs().sum() == 0  # peft initializes B at zero...
    opt.step()
    assert lora_b.abs().sum() > 0  # ...and one Muon step moves it

    all_adamw = build_optimizer(model, OptimConfig(name="adamw", lr=1e-4))
    assert type(all_adamw) is torch.optim.AdamW
    assert sum(len(g["params"]) for g in all_adamw.param_groups) == len(muon) + 1


def test_batched_newton_schulz_equals_one_at_a_time():
    g = torch.Generator().manual_seed(3)
    mats = [torch.randn(24, 40, generator=g) for _ in range(3)] + [torch.randn(40, 24, generator=g)]
    batched = orthogonalize(mats)
    for m, b in zip(mats, batched):
        one = newton_schulz(m)
        assert b.shape == m.shape
        assert (b.float() - one.float()).abs().max().item() < 2e-2  # bf16 rounding of bmm vs mm
