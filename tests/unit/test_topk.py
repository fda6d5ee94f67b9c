"""The top-k KD loss (bucket and renorm tails) by hand, against the full kd_loss, and its gradients."""
from __future__ import annotations

import math

import pytest
import torch

from refinery.train.losses import kd_loss
from refinery.train.teacher_logits import topk_of_logits
from refinery.train.topk import topk_kd_loss, topk_log_probs

P = [0.5, 0.3, 0.15, 0.05]  # teacher distribution over a 4-token vocab; its top 2 = tokens 0, 1
Q = [0.25, 0.25, 0.25, 0.25]  # student
# By hand (natural log), k = 2:
# bucket: classes {0, 1, tail}: teacher [.5, .3, .2], student [.25, .25, .5]
#   .5 ln(.5/.25) + .3 ln(.3/.25) + .2 ln(.2/.5) = .346574 + .054697 - .183258
BUCKET = 0.218012
# reverse: .25 ln(.25/.5) + .25 ln(.25/.3) + .5 ln(.5/.2) = -.173287 - .045580 + .458145
BUCKET_REV = 0.239278
# renorm: teacher [.5, .3] / .8 = [.625, .375], student [.5, .5]
#   .625 ln(1.25) + .375 ln(.75) = .139465 - .107881
RENORM = 0.031584


def _log(d):
    return torch.tensor([math.log(x) for x in d], dtype=torch.float64)


def _cache(p, k, temperature):
    """The cache's (values, indices, log_tail) of one position whose teacher softmax is p."""
    return topk_of_logits(_log(p)[None], k, temperature)


def _loss(p=P, q=Q, k=2, temperature=1.0, label=0, **kw):
    v, i, t = _cache(p, k, temperature)
    s = _log(q)[None, None].clone().requires_grad_(True)
    out = topk_kd_loss(s, v[None], i[None], t[None], torch.tensor([[label]]), torch.tensor([[True]]),
                       temperature=temperature, **kw)
    return out, s


def test_cache_of_one_position():
    v, i, t = _cache(P, 2, 1.0)
    assert i.tolist() == [[0, 1]]
    assert v[0, 0].item() == 0.0  # stored minus the max
    assert v[0, 1].item() == pytest.approx(math.log(0.3 / 0.5), abs=1e-6)
    assert t.item() == pytest.approx(math.log(0.2), abs=1e-6)  # .15 + .05 outside the top 2
    # At T=2 the softened teacher is sqrt(p)/sum: tail = (sqrt(.15) + sqrt(.05)) / sum(sqrt(p)) = .32743
    assert _cache(P, 2, 2.0)[2].exp().item() == pytest.approx(0.327434, abs=1e-6)
    assert _cache(P, 4, 1.0)[2].item() == float("-inf")  # k = V: no tail


@pytest.mark.parametrize("tail,kind,expected", [("bucket", "forward_kl", BUCKET), ("bucket", "reverse_kl", BUCKET_REV),
                                                ("renorm", "forward_kl", RENORM)])
def test_by_hand(tail, kind, expected):
    out, _ = _loss(tail=tail, divergence=kind)
    assert out.kd.item() == pytest.approx(expected, abs=1e-6)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)  # alpha 1, T 1
    assert out.ce.item() == pytest.approx(math.log(4), abs=1e-6)


def test_temperature_and_alpha_mix():
    pt = [math.sqrt(x) / sum(math.sqrt(y) for y in P) for x in P]  # [.3790, .2936, .2076, .1198]
    # student uniform at any T; bucket classes: teacher [.3790, .2936, .3274], student [.25, .25, .5]
    kl_t = sum(a * math.log(a / b) for a, b in zip([pt[0], pt[1], pt[2] + pt[3]], [0.25, 0.25, 0.5]))
    out, _ = _loss(temperature=2.0, alpha=0.25, label=1)
    assert out.kd.item() == pytest.approx(kl_t, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.25 * 4 * kl_t + 0.75 * math.log(4), abs=1e-6)  # CE untempered


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_full_vocab_equals_kd_loss(kind, tail):
    """k = V: the top-k loss is the full-vocabulary loss (values, gradients), in both tail modes."""
    torch.manual_seed(0)
    vocab, temperature = 50, 2.0
    t_logits = torch.randn(2, 5, vocab) * 3
    labels = torch.randint(0, vocab, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    v, i, lt = topk_of_logits(t_logits.reshape(-1, vocab), vocab, temperature)
    v, i, lt = v.reshape(2, 5, vocab), i.reshape(2, 5, vocab), lt.reshape(2, 5)
    s1 = (torch.randn(2, 5, vocab) * 2).requires_grad_(True)
    s2 = s1.detach().clone().requires_grad_(True)
    kw = {"alpha": 0.5, "temperature": temperature, "divergence": kind}
    full = kd_loss(s1, t_logits, labels, mask, **kw)
    top = topk_kd_loss(s2, v, i, lt, labels, mask, tail=tail, **kw)
    assert top.kd.item() == pytest.approx(full.kd.item(), rel=1e-5, abs=1e-7)
    assert top.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    full.loss.backward()
    top.loss.backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_gradient_flows_and_descends(kind, tail):
    torch.manual_seed(1)
    vocab, k = 40, 5
    v, i, lt = topk_of_logits(torch.randn(6, vocab) * 4, k, 2.0)
    s = torch.zeros(6, vocab, requires_grad=True)
    labels, mask = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.bool)
    losses = []
    for _ in range(40):
        out = topk_kd_loss(s, v, i, lt, labels, mask, temperature=2.0, divergence=kind, tail=tail)
        s.grad = None
        out.loss.backward()
        assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
        losses.append(out.loss.item())
        with torch.no_grad():
            s -= 8.0 * s.grad
    assert losses[-1] < 0.5 * losses[0], losses
    if tail == "renorm":  # only the teacher's top k take gradient
        assert (s.grad.abs().sum(0) > 0).sum() <= k * 6


@pytest.mark.parametrize("k", [5, 40])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_fused_forward_kl_equals_autograd(tail, k):
    """The blockwise closed-form gradient (what training uses) against plain autograd, CE mixed in."""
    torch.manual_seed(2)
    vocab = 40
    v, i, lt = topk_of_logits(torch.randn(7, vocab) * 4, k, 2.0)
    v, i, lt = v.reshape(1, 7, k), i.reshape(1, 7, k), lt.reshape(1, 7)
    labels = torch.randint(0, vocab, (1, 7))
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    s1 = (torch.randn(1, 7, vocab) * 3).requires_grad_(True)
    s2 = s1.detach().clone().requires_grad_(True)
    kw = {"alpha": 0.7, "temperature": 2.0, "tail": tail}
    fused = topk_kd_loss(s1, v, i, lt, labels, mask, **kw)
    plain = topk_kd_loss(s2, v, i, lt, labels, mask, fused=False, **kw)
    for a, b in zip(fused, plain):
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-7)
    fused.loss.backward()
    plain.loss.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)
    assert (s1.grad[~mask] == 0).all()


def test_bucket_gradient_is_student_minus_spread_teacher():
    """d KL / d s = (q - p~) / T, p~ = teacher on the top k, its tail spread like the student's tail."""
    out, s = _loss(k=2)
    out.loss.backward()
    p_tilde = [0.5, 0.3, 0.2 * 0.5, 0.2 * 0.5]  # student tail .5 split evenly over tokens 2, 3
    torch.testing.assert_close(s.grad[0, 0], torch.tensor(Q, dtype=torch.float64) - torch.tensor(p_tilde),
                               rtol=0, atol=1e-6)


def test_zero_tail_keeps_every_divergence_finite():
    v, i, _ = _cache(P, 2, 1.0)
    s = torch.zeros(1, 4, requires_grad=True)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        t, q = topk_log_probs(s, v, i, torch.tensor([float("-inf")]), 1.0, "bucket")
        assert torch.isfinite(t).all() and torch.isfinite(q).all()
        out = topk_kd_loss(s[None], v[None], i[None], torch.tensor([[float("-inf")]]), torch.tensor([[0]]),
                           torch.tensor([[True]]), temperature=1.0, divergence=kind)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(s.grad).all()


def test_errors_name_the_fix():
    v, i, _ = _cache(P, 2, 1.0)
    s, lab, m = torch.zeros(1, 1, 4), torch.tensor([[0]]), torch.tensor([[True]])
    with pytest.raises(ValueError, match="topk_tail=renorm"):
        topk_kd_loss(s, v[None], i[None], torch.tensor([[float("nan")]]), lab, m)
    assert topk_kd_loss(s, v[None], i[None], None, lab, m, tail="renorm",
                        temperature=1.0).kd.item() == pytest.approx(RENORM, abs=1e-6)
    with pytest.raises(ValueError, match="topk_tail: got 'drop'"):
        topk_kd_loss(s, v[None], i[None], None, lab, m, tail="drop")
    with pytest.raises(ValueError, match="divergence: got 'tv'"):
        topk_kd_loss(s, v[None], i[None], None, lab, m, tail="renorm", divergence="tv")
    with pytest.raises(ValueError, match="no teacher top-k"):
        topk_kd_loss(s, None, None, None, lab, m)
    ce = topk_kd_loss(s, None, None, None, lab, m, alpha=0.0)
    assert ce.loss.item() == pytest.approx(math.log(4), abs=1e-6)


@pytest.mark.parametrize("engine,temperature,installed,picked", [
    ("auto", 1.0, True, "vllm"), ("auto", 2.0, True, "hf"), ("auto", 1.0, False, "hf"),
    ("hf", 1.0, True, "hf"), ("vllm", 2.0, True, "vllm")])
def test_engine_pick(monkeypatch, engine, temperature, installed, picked):
    """auto takes vLLM only where its T=1 log-probs give an exact tail."""
    from refinery.distill import engines
    from refinery.train.config import TeacherLogitsConfig
    from refinery.train.teacher_logits import pick_engine

    monkeypatch.setattr(engines, "vllm_available", lambda: installed)
    assert pick_engine(TeacherLogitsConfig(engine=engine, temperature=temperature)) == picked


def test_engine_vllm_missing_names_the_fix(monkeypatch):
    from refinery.core.config import ConfigError
    from refinery.distill import engines
    from refinery.train.config import TeacherLogitsConfig
    from refinery.train.teacher_logits import pick_engine

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    with pytest.raises(ConfigError, match="teacher_logits.engine=hf"):
        pick_engine(TeacherLogitsConfig(engine="vllm"))
