"""DeepSpeed ZeRO-2 / ZeRO-3 for distill (`distill.parallel.strategy=deepspeed`).

Muon under ZeRO: a client optimizer only ever sees flat 1-D partitions, so our Muon cannot
run inside ZeRO. DeepSpeed's own Muon (`"type": "Muon"`) orthogonalizes the full 2-D
gradient before it is partitioned (ZeRO-2) or with the full gradient all-reduced
(ZeRO-3, `reduce_scatter: false`). Its update is ours with lr_scale=original, Nesterov and 5
Newton-Schulz steps (`ns_method: standard`, bf16); other settings are refused here rather
than silently changed, and `check_muon` fails the run unless DeepSpeed really built its Muon
with every 2-D trainable matrix tagged for it. tests/distributed checks one step against
our single-process Muon, which fails for per-shard orthogonalization or a plain SGD step.

Checkpoints stay ours (per-rank safetensors + torch.load(weights_only=True)); DeepSpeed's
own checkpoint loader unpickles (weights_only=False), so it is not used.
"""
from __future__ import annotations

import logging

import torch

from refinery.train.optim import build_scheduler, split_params

log = logging.getLogger("refinery.train")


def check_supported(cfg) -> None:
    """Settings DeepSpeed's Muon cannot express: refuse them by name."""
    o = cfg.optim
    if o.name != "muon":
        return
    bad = [(k, v, want) for k, v, want in [("lr_scale", o.lr_scale, "original"), ("nesterov", o.nesterov, True),
                                           ("ns_steps", o.ns_steps, 5)] if v != want]
    if bad:
        k, v, want = bad[0]
        raise ValueError(f"distill.optim.{k}={v} is not available with distill.parallel.strategy=deepspeed "
                         f"(DeepSpeed's Muon has {k}={want} built in); use {want}, or strategy ddp/fsdp2 "
                         "where our Muon runs")


def ds_config(cfg, world) -> dict:
    o = cfg.optim
    if o.name == "muon":
        optimizer = {"type": "Muon", "params": {"lr": o.lr, "muon_lr": o.lr, "adam_lr": o.adamw_lr,
                                                  "momentum": o.momentum, "weight_decay": o.weight_decay,
                                                  "betas": list(o.betas), "ns_method": "standard"}}
    else:
        optimizer = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas),
                                                   "weight_decay": o.weight_decay, "torch_adam": True}}
    zero = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage == 3:
        zero["reduce_scatter"] = False  # DeepSpeed's Muon needs whole gradients at ZeRO-3
    return {"train_micro_batch_size_per_gpu": cfg.batch_size // world.size,
            "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": cfg.batch_size * cfg.grad_accum,
            # DeepSpeed clips after its Muon has written the orthogonalized update into the gradient:
            # that would shrink every Muon step by the update's norm. Clip only without Muon.
            "gradient_clipping": 0.0 if o.name == "muon" else (o.grad_clip or 0.0),
            "zero_optimization": zero, "optimizer": optimizer,
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def initialize(model: torch.nn.Module, cfg, world):
    """(engine, the optimizer DeepSpeed built): the student under ZeRO with our LR schedule."""
    import deepspeed

    check_supported(cfg)
    if cfg.optim.name == "muon" and cfg.optim.grad_clip:
        log.warning("distill: optim.grad_clip=%s is not applied under deepspeed with Muon (DeepSpeed would clip "
                    "the orthogonalized update, not the gradient)", cfg.optim.grad_clip)
    muon, adamw = split_params(model)
    for p in model.parameters():
        p.use_muon = False
    for _, p in muon:
        p.use_muon = cfg.optim.name == "muon"
    params = [p for _, p in muon + adamw]
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config(cfg, world),
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.optim, cfg.steps))
    if cfg.optim.name == "muon":
        check_muon(engine, [p for _, p in muon])
    return engine


def check_muon(engine, matrices: list[torch.Tensor]) -> None:
    """Fail unless DeepSpeed runs its Muon, under ZeRO-2/3, on every 2-D trainable matrix."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    stage = engine.zero_optimization_stage()
    problems = []
    if not isinstance(inner, MuonWithAuxAdam):
        problems.append(f"optimizer is {type(inner).__name__}, not DeepSpeed's MuonWithAuxAdam")
    if stage not in (2, 3):
        problems.append(f"ZeRO stage {stage} (DeepSpeed's Muon skips Newton-Schulz outside ZeRO 1-3)")
    untagged = [p for p in matrices if not getattr(p, "use_muon", False)]
    if untagged:
        problems.append(f"{len(untagged)} matrices not tagged use_muon")
    groups = [g for g in inner.param_groups if g.get("use_muon")]
    if not groups or any(g.get("ns_method", "gram") != "standard" for g in groups):
        problems.append("no Muon param group with ns_method=standard")
    if problems:
        raise RuntimeError("distill: DeepSpeed would not run Muon as configured: " + "; ".join(problems))
    log.info("distill: DeepSpeed ZeRO-%d with its Muon on %d matrices (Newton-Schulz on whole matrices)",
             stage, len(matrices))
