"""Our Muon optimizer with its AdamW side group (the optimizer a run builds: refinery.train.optim).

Muon (https://kellerjordan.github.io/posts/muon/) replaces each 2-D update by the nearest
semi-orthogonal matrix: momentum (Nesterov) -> 5 Newton-Schulz quintic iterations in bf16 on
X / ||X||_F -> a per-shape learning-rate scale. It matches `torch.optim.Muon` step for step
(tests/unit/test_muon.py) but is written for what torch's is not:

- `orthogonalize(list_of_matrices)` is a separate function; a distributed subclass overrides
  only `Muon._orthogonalize` (who runs Newton-Schulz on which matrix) and `Muon._view` (the
  rank's local shard of a param), and keeps the momentum and update arithmetic here;
- the per-shape LR rule is a declared setting (`lr_scale`), searchable like any other key;
- param groups with `use_muon=False` get AdamW in the same optimizer, so one scheduler and one
  state_dict cover the whole student (as in the reference `MuonWithAuxAdam`).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
LR_SCALES = ("original", "match_rms_adamw", "none")


def lr_scale(rule: str, shape: tuple[int, ...]) -> float:
    """Muon's per-shape learning-rate multiplier for a (rows, cols) matrix.

    `original` = max(1, rows/cols) ** 0.5 (Keller Jordan), `match_rms_adamw` = 0.2 * sqrt(max(rows, cols))
    (Moonshot: update RMS like AdamW's, so AdamW learning rates carry over), `none` = 1.
    """
    rows, cols = shape[0], shape[1]
    if rule == "original":
        return math.sqrt(max(1.0, rows / cols))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if rule == "none":
        return 1.0
    raise ValueError(f"Muon lr_scale: got {rule!r}, expected one of {', '.join(LR_SCALES)}")


def newton_schulz(g: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7) -> Tensor:
    """Approximate U V^T of g = U S V^T with the quintic Newton-Schulz iteration, in bf16.

    `g` is one matrix (m, n) or a batch of same-shape matrices (b, m, n), each orthogonalized on
    its own. The coefficients maximize the slope at 0, so singular values land in roughly
    [0.7, 1.2] rather than exactly 1; that is what Muon wants (fast, and the loss does not care).
    """
    if g.ndim not in (2, 3):
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    # Frobenius norm >= spectral norm, so all singular values start in [0, 1].
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    mm, add = (torch.addmm, torch.addmm) if x.ndim == 2 else (torch.baddbmm, torch.baddbmm)
    for _ in range(steps):
        gram = x @ x.mT
        poly = mm(gram, gram, gram, beta=b, alpha=c)
        x = add(x, poly, x, beta=a)
    return x.mT if tall else x


def orthogonalize(updates: list[Tensor], steps: int = 5,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS) -> list[Tensor]:
    """Newton-Schulz over a list of matrices, same-shape ones batched into one call each."""
    by_shape: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        by_shape.setdefault(tuple(u.shape), []).append(i)
    out: list[Tensor] = [None] * len(updates)  # type: ignore[list-item]
    for idx in by_shape.values():
        if len(idx) == 1:
            out[idx[0]] = newton_schulz(updates[idx[0]], steps, coefficients)
            continue
        for i, res in zip(idx, newton_schulz(torch.stack([updates[i] for i in idx]), steps, coefficients)):
            out[i] = res
    return out


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices; groups with `use_muon=False` are updated with AdamW instead.

    Muon groups: lr, momentum, nesterov, ns_steps, weight_decay, lr_scale.
    AdamW groups: lr, betas, eps, weight_decay. Weight decay is decoupled in both:
    p <- p * (1 - lr * weight_decay), with the unscaled group lr (as torch.optim.Muon does).
    """

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, lr_scale: str = "original",
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(f"Muon: bad hyperparameters lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} ns_steps={ns_steps}")
        if lr_scale not in LR_SCALES:
            raise ValueError(f"Muon lr_scale: got {lr_scale!r}, expected one of {', '.join(LR_SCALES)}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, lr_scale=lr_scale, betas=tuple(betas), eps=eps,
                        use_muon=True)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if not group["use_muon"]:
                continue
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon takes only 2-D matrices, got a parameter of shape {tuple(p.shape)}: "
                        "put embeddings, norms, biases and other non-2-D params in a group with "
                        "use_muon=False (AdamW), e.g. via refinery.train.optim.build_optimizer")

    def _view(self, t: Tensor) -> Tensor:
        """The tensor the element-wise arithmetic runs on (a distributed subclass: the local shard)."""
        return t

    def _orthogonalize(self, updates: list[Tensor], params: list[Tensor], group: dict) -> list[Tensor]:
        """Newton-Schulz of each update (`params`: whose updates, for their full shapes)."""
        return orthogonalize(updates, group["ns_steps"])

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param with a gradient; returns closure() if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["use_muon"]:
                self._muon_step(group, params)
            else:
                self._adamw_step(group, params)
        return loss

    def _muon_step(self, group: dict, params: list[Tensor]) -> None:
        mu, lr = group["momentum"], group["lr"]
        grads = [self._view(p.grad) for p in params]
        bufs = [self._view(self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))) for p in params]
        # EMA form of momentum (buf = mu*buf + (1-mu)*g); the scale is removed by the
        # normalization inside Newton-Schulz, so this equals the classic form's direction.
        torch._foreach_lerp_(bufs, grads, 1 - mu)
        updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        ortho = self._orthogonalize(updates, params, group)
        weights = [self._view(p) for p in params]
        if group["weight_decay"]:
            torch._foreach_mul_(weights, 1 - lr * group["weight_decay"])
        for w, u, p in zip(weights, ortho, params):
            w.add_(u.to(w.dtype), alpha=-lr * lr_scale(group["lr_scale"], tuple(p.shape)))

    def _adamw_step(self, group: dict, params: list[Tensor]) -> None:
        (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
        for p in params:
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            t = st["step"].item()
            st["exp_avg"].lerp_(p.grad, 1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
            p.mul_(1 - lr * group["weight_decay"])
            p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** t))
