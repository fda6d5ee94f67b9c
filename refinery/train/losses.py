"""The distillation loss: alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * CE.

Logits come in already aligned with their targets (position t predicts labels[t]; the caller
shifts). Everything is averaged over the tokens where `mask` is true.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


class KDLoss(NamedTuple):
    """The training loss and its parts (the unscaled divergence and the cross-entropy)."""

    loss: Tensor
    kd: Tensor
    ce: Tensor


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row, from log-probabilities (0 * log 0 counted as 0, not nan)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def token_divergence(teacher_logp: Tensor, student_logp: Tensor, kind: str, jsd_beta: float = 0.5) -> Tensor:
    """Per-token divergence between teacher p and student q (rows of log-probabilities).

    forward_kl = KL(p || q) (mean-seeking, the method's choice); reverse_kl = KL(q || p)
    (mode-seeking); jsd = beta * KL(p || m) + (1 - beta) * KL(q || m) with
    m = beta * p + (1 - beta) * q (the generalized JSD of GKD; beta = 0.5 is the symmetric JSD).
    """
    if kind == "forward_kl":
        return _kl(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return _kl(student_logp, teacher_logp)
    if kind == "jsd":
        if not 0 < jsd_beta < 1:
            raise ValueError(f"jsd_beta: got {jsd_beta}, expected a number in (0, 1)")
        log_m = torch.logsumexp(torch.stack([teacher_logp + math.log(jsd_beta),
                                             student_logp + math.log(1 - jsd_beta)]), dim=0)
        return jsd_beta * _kl(teacher_logp, log_m) + (1 - jsd_beta) * _kl(student_logp, log_m)
    raise ValueError(f"divergence: got {kind!r}, expected one of {', '.join(DIVERGENCES)}")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor, mask: Tensor,
            alpha: float = 1.0, temperature: float = 2.0, divergence: str = "forward_kl",
            jsd_beta: float = 0.5) -> KDLoss:
    """alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * CE, averaged over masked-in tokens.

    student_logits, teacher_logits: (..., V); labels, mask: (...). The T^2 factor keeps the
    gradient scale of the soft term independent of T (Hinton et al.). `divergence` is one of
    forward_kl, reverse_kl, jsd (see token_divergence). teacher_logits may be None only when alpha == 0.
    """
    if not 0 <= alpha <= 1 or temperature <= 0:
        raise ValueError(f"kd_loss: alpha must be in [0, 1] and temperature > 0, got {alpha}, {temperature}")
    mask = mask.bool()
    if not mask.any():
        raise ValueError("kd_loss: the mask selects no tokens (every example empty or padded out)")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(f"kd_loss: teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ; teacher and student must share the "
                         "tokenizer and vocab size")
    if teacher_logits is not None and divergence == "forward_kl":
        vocab = student_logits.shape[-1]
        rows = mask.reshape(-1).nonzero().squeeze(1)
        per_row, kd, ce = _FusedForwardKL.apply(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab),
                                                labels.reshape(-1), rows, float(alpha), float(temperature))
        return KDLoss(per_row.mean(), kd.mean(), ce.mean())
    # Select the counted tokens first: padding never reaches the vocab-sized softmaxes.
    s = student_logits[mask].float()
    # With alpha = 1 the CE is only logged: no graph for it (a vocab-sized backward saved).
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1):
        ce = F.cross_entropy(s, labels[mask])
    if teacher_logits is None:
        if alpha > 0:
            raise ValueError("kd_loss: teacher_logits is None but alpha > 0")
        return KDLoss(ce, torch.zeros_like(ce), ce)
    with torch.no_grad():
        t = teacher_logits[mask].float() / temperature
    kd = token_divergence(F.log_softmax(t, -1), F.log_softmax(s / temperature, -1), divergence, jsd_beta).mean()
    loss = alpha * temperature ** 2 * kd + (1 - alpha) * ce
    return KDLoss(loss, kd, ce)


class _FusedForwardKL(torch.autograd.Function):
    """Per-token alpha*T^2*KL(p_T || q_T) + (1-alpha)*CE, its parts, and the closed-form gradient.

    The step's hot spot: a dozen passes over (tokens x vocab) floats, bound by memory bandwidth
    on CPU. Here each block of rows is read once while it sits in cache, and the gradient
    alpha*T*(q_T - p_T) + (1-alpha)*(softmax(s) - onehot) is written then, so autograd keeps
    no vocab-sized intermediates. Inputs are flat (rows x vocab) views; `rows` picks the counted ones.
    """

    @staticmethod
    def forward(ctx, s, t, labels, rows, alpha, temperature):
        n, vocab = rows.numel(), s.shape[1]
        per_row, kd, ce = (torch.empty(n, device=s.device) for _ in range(3))
        grad = torch.empty(n, vocab, dtype=s.dtype, device=s.device) if ctx.needs_input_grad[0] else None
        block = max(1, (1 << 20) // vocab)  # ~4 MB of floats per temporary
        for i in range(0, n, block):
            r = rows[i:i + block]
            sf, tf, lab = s[r].float(), t[r].float(), labels[r]
            log_p = F.log_softmax(tf / temperature, -1)
            p = log_p.exp()
            log_q = F.log_softmax(sf / temperature, -1)
            kd[i:i + block] = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # 0 log 0 = 0
            lse = torch.logsumexp(sf, -1)
            ce[i:i + block] = lse - sf.gather(1, lab[:, None]).squeeze(1)
            if grad is not None:
                g = (log_q.exp_() - p).mul_(alpha * temperature)
                if alpha < 1:
                    add_ce_grad_(g, sf, lse, lab, 1 - alpha)
                grad[i:i + block] = g
        return rows_out(ctx, s.shape, kd, ce, grad, rows, alpha, temperature)

    @staticmethod
    def backward(ctx, g_row, _g_kd, _g_ce):
        return rows_grad(ctx, g_row), None, None, None, None, None


def add_ce_grad_(g: Tensor, logits: Tensor, lse: Tensor, labels: Tensor, weight: float) -> None:
    """g += weight * d CE / d logits = weight * (softmax(logits) - onehot(labels)), in place."""
    soft = (logits - lse[:, None]).exp_()
    soft.scatter_add_(1, labels[:, None], torch.full_like(lse[:, None], -1.0))
    g.add_(soft, alpha=weight)


def rows_out(ctx, shape, kd: Tensor, ce: Tensor, grad: Tensor, rows: Tensor, alpha: float, temperature: float):
    """End of a fused per-row KD forward: (per-row loss, kd, ce), with what `rows_grad` needs saved."""
    ctx.save_for_backward(grad, rows)
    ctx.shape = shape
    ctx.mark_non_differentiable(kd, ce)
    return alpha * temperature ** 2 * kd + (1 - alpha) * ce, kd, ce


def rows_grad(ctx, g_row: Tensor) -> Tensor:
    """Backward of the fused per-row losses: the saved per-row gradients, scaled, put back in place."""
    grad, rows = ctx.saved_tensors
    full = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device)
    full.index_copy_(0, rows, grad * g_row[:, None].to(grad.dtype))
    return full
