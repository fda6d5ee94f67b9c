"""kd_loss against numbers worked out by hand on 3-token vocabularies."""
from __future__ import annotations

import math

import pytest
import torch

from refinery.train.losses import kd_loss

P = [0.7, 0.2, 0.1]  # teacher distribution
Q = [0.2, 0.5, 0.3]  # student distribution
# By hand (natural log):
# KL(P||Q) = .7 ln(.7/.2) + .2 ln(.2/.5) + .1 ln(.1/.3) = .876934 - .183258 - .109861
FWD = 0.583815
# KL(Q||P) = .2 ln(.2/.7) + .5 ln(.5/.2) + .3 ln(.3/.1) = -.250553 + .458145 + .329584
REV = 0.537177
# M = (P+Q)/2 = [.45, .35, .2]; KL(P||M) = .128045, KL(Q||M) = .137791; JSD = their mean
JSD = 0.132918


def _logits(*dists):
    """(1, n, 3) logits whose softmax is exactly each given distribution."""
    return torch.tensor([[[math.log(x) for x in d] for d in dists]], dtype=torch.float64)


def _one(p=P, q=Q, label=0, **kw):
    return kd_loss(_logits(q), _logits(p), torch.tensor([[label]]), torch.tensor([[True]]), **kw)


@pytest.mark.parametrize("kind,expected", [("forward_kl", FWD), ("reverse_kl", REV), ("jsd", JSD)])
def test_divergences_by_hand(kind, expected):
    out = _one(alpha=1.0, temperature=1.0, divergence=kind)
    assert out.kd.item() == pytest.approx(expected, abs=1e-5)
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)  # alpha=1, T=1: loss is the divergence
    assert out.ce.item() == pytest.approx(-math.log(0.2), abs=1e-6)  # label 0, student prob .2


def test_temperature_and_alpha_mix():
    # T=2 divides the log-probs by 2: the softened distributions are proportional to sqrt(p).
    pt = [math.sqrt(x) / sum(math.sqrt(y) for y in P) for x in P]  # [.5229, .2795, .1976]
    qt = [math.sqrt(x) / sum(math.sqrt(y) for y in Q) for x in Q]  # [.2628, .4154, .3218]
    kl_t = sum(a * math.log(a / b) for a, b in zip(pt, qt))
    assert kl_t == pytest.approx(0.1527, abs=1e-4)  # .3598 - .1108 - .0964
    out = _one(alpha=0.25, temperature=2.0, label=1)
    assert out.kd.item() == pytest.approx(kl_t, abs=1e-6)
    # 0.25 * 2^2 * KL_T + 0.75 * (-ln .5): CE always on the untempered student logits
    assert out.loss.item() == pytest.approx(0.25 * 4 * kl_t + 0.75 * math.log(2), abs=1e-6)


def test_alpha_zero_is_cross_entropy():
    out = _one(alpha=0.0, label=2)
    assert out.loss.item() == pytest.approx(-math.log(0.3), abs=1e-6)
    no_teacher = kd_loss(_logits(Q), None, torch.tensor([[2]]), torch.tensor([[True]]), alpha=0.0)
    assert no_teacher.loss.item() == pytest.approx(-math.log(0.3), abs=1e-6)
    with pytest.raises(ValueError, match="teacher_logits is None"):
        kd_loss(_logits(Q), None, torch.tensor([[2]]), torch.tensor([[True]]), alpha=0.5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_identical_logits_zero_divergence(kind):
    logits = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(0)) * 5
    out = kd_loss(logits, logits.clone(), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5),
                  alpha=1.0, temperature=2.0, divergence=kind)
    assert abs(out.kd.item()) < 1e-6 and abs(out.loss.item()) < 1e-5


def test_mask_averages_only_counted_tokens():
    # token 0: teacher P, student Q; token 1: swapped (KL = REV); token 2: garbage, masked out.
    student = torch.cat([_logits(Q, P), torch.tensor([[[50.0, -50.0, 0.0]]], dtype=torch.float64)], 1)
    teacher = torch.cat([_logits(P, Q), torch.tensor([[[-50.0, 50.0, 0.0]]], dtype=torch.float64)], 1)
    labels = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[1, 1, 0]])
    out = kd_loss(student, teacher, labels, mask, alpha=1.0, temperature=1.0)
    assert out.kd.item() == pytest.approx((FWD + REV) / 2, abs=1e-5)  # 0.560496
    # CE: token 0 -ln .2, token 1 (student P, label 1) -ln .2 as well
    assert out.ce.item() == pytest.approx(-math.log(0.2), abs=1e-6)
    assert kd_loss(student, teacher, labels, torch.ones(1, 3), alpha=1.0, temperature=1.0).kd.item() > 10


def test_forward_kl_gradient_is_q_minus_p():
    # d KL(P||softmax(s)) / d s = softmax(s) - P: at T=1 that is Q - P.
    s = _logits(Q).requires_grad_(True)
    kd_loss(s, _logits(P), torch.tensor([[0]]), torch.tensor([[True]]), alpha=1.0, temperature=1.0).loss.backward()
    assert s.grad[0, 0].tolist() == pytest.approx([-0.5, 0.3, 0.2], abs=1e-6)


def test_mixed_gradient_by_hand():
    # alpha=.5, T=1, label 0: .5 * (Q - P) + .5 * (Q - onehot(0)) = .5*[-.5,.3,.2] + .5*[-.8,.5,.3]
    s = _logits(Q).requires_grad_(True)
    kd_loss(s, _logits(P), torch.tensor([[0]]), torch.tensor([[True]]), alpha=0.5, temperature=1.0).loss.backward()
    assert s.grad[0, 0].tolist() == pytest.approx([-0.65, 0.4, 0.25], abs=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_matches_torch_kl_div_and_cross_entropy(divergence):
    """Loss and gradient on a padded batch against torch's own kl_div / cross_entropy."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    s0, t = torch.randn(2, 6, 40, generator=g) * 3, torch.randn(2, 6, 40, generator=g) * 3
    labels = torch.randint(0, 40, (2, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    s = s0.clone().requires_grad_(True)
    out = kd_loss(s, t, labels, mask, alpha=0.3, temperature=2.0, divergence=divergence)
    out.loss.backward()

    r = s0.clone().requires_grad_(True)
    log_q, log_p = F.log_softmax(r[mask] / 2, -1), F.log_softmax(t[mask] / 2, -1)
    kl = (F.kl_div(log_q, log_p, log_target=True, reduction="none") if divergence == "forward_kl"
          else F.kl_div(log_p, log_q, log_target=True, reduction="none")).sum(-1).mean()
    ref = 0.3 * 4 * kl + 0.7 * F.cross_entropy(r[mask], labels[mask])
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert out.kd.item() == pytest.approx(kl.item(), rel=1e-5)
    assert torch.allclose(s.grad, r.grad, atol=1e-6)
    assert s.grad[0, 4:].abs().max() == 0  # padded positions get no gradient


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no tokens"):
        kd_loss(_logits(Q), _logits(P), torch.tensor([[0]]), torch.tensor([[False]]))
    with pytest.raises(ValueError, match="tokenizer"):
        kd_loss(_logits(Q), torch.zeros(1, 1, 4), torch.tensor([[0]]), torch.tensor([[True]]))
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd"):
        _one(divergence="tvd")
