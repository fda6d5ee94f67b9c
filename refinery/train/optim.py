"""The optimizer and learning-rate schedule of a run: Muon (or DistMuon) with its AdamW group, or AdamW."""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from refinery.train.dist_muon import DistMuon
from refinery.train.muon import Muon


def split_params(model: torch.nn.Module) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """(Muon params, AdamW params) among the trainable ones, as (name, param) pairs.

    Muon gets 2-D hidden matrices (LoRA A and B, linear weights). AdamW gets everything else:
    1-D params (norms, biases) and the token embeddings / lm_head, whose rows are looked up
    one token at a time so an orthogonalized whole-matrix update makes no sense for them.
    """
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_io = any(k in name for k in ("embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings"))
        (muon if p.ndim == 2 and not is_io else adamw).append((name, p))
    return muon, adamw


def build_optimizer(model: torch.nn.Module, cfg, distributed: bool = False) -> torch.optim.Optimizer:
    """The optimizer for `model`'s trainable params from an OptimConfig.

    `muon`: one Muon with a Muon group (2-D hidden matrices, lr=cfg.lr) and an AdamW group
    (the rest, lr=cfg.adamw_lr). `adamw`: torch AdamW on everything at cfg.lr. `distributed`:
    DistMuon (each matrix orthogonalized once, by one rank) in place of Muon.
    """
    muon, adamw = split_params(model)
    if not muon and not adamw:
        raise ValueError("build_optimizer: the model has no trainable parameters (is the LoRA adapter attached?)")
    betas = tuple(cfg.betas)
    if cfg.name == "adamw":
        return torch.optim.AdamW([p for _, p in muon + adamw], lr=cfg.lr, betas=betas,
                                 weight_decay=cfg.weight_decay)
    groups = []
    if muon:
        groups.append({"params": [p for _, p in muon], "use_muon": True, "lr": cfg.lr})
    if adamw:
        groups.append({"params": [p for _, p in adamw], "use_muon": False, "lr": cfg.adamw_lr})
    cls = DistMuon if distributed else Muon
    return cls(groups, momentum=cfg.momentum, nesterov=cfg.nesterov, ns_steps=cfg.ns_steps,
                weight_decay=cfg.weight_decay, lr_scale=cfg.lr_scale, betas=betas)


def lr_lambda(step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.1):
    """LR multiplier at `step` (0-based): linear warmup, then constant, cosine or linear decay to min_ratio."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - (1 - min_ratio) * progress
    raise ValueError(f"schedule: got {schedule!r}, expected constant, cosine or linear")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int):
    """A LambdaLR applying `lr_lambda` to every group (Muon and AdamW share the shape of the schedule)."""
    fn = partial(lr_lambda, total=total_steps, warmup=cfg.warmup_steps, schedule=cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
