"""Training of the `distill` stage (in each process; starting them: train/launch.py): the LoRA
student trained on the frozen teacher's softened logits.

    refinery distill configs/quickstart.yaml [distill.steps=50 ...]

setup (data, models, optimizer) -> resume from the newest checkpoint -> train (checkpoint
every `checkpoint_every` steps, metrics.jsonl row per step) -> save the adapter. Killed or
preempted runs call the same stage again and continue on the same loss curve.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from refinery.core.config import config_hash, to_dict
from refinery.core.manifest import (
    atomic_path,
    file_hash,
    manifest_hash,
    read_jsonl,
    read_jsonl_prefix,
    write_jsonl,
)
from refinery.core.models import resolve_model, resolve_models
from refinery.core.stage import Context, Result
from refinery.train import checkpoint as ckpt
from refinery.train import dist
from refinery.train.config import DistillConfig, hashed
from refinery.train.data import collate, load_rows, sample_indices, tokenize_rows
from refinery.train.dist import World
from refinery.train.optim import build_optimizer, build_scheduler
from refinery.train.preempt import Preempted, StopFlag
from refinery.train.teacher import Teacher

log = logging.getLogger("refinery.train")


@dataclass
class Setup:
    """Everything the loop needs, built once per invocation."""

    student: torch.nn.Module
    """What the step calls: the peft model, its DDP wrapper, or the FSDP2-sharded peft model."""
    model: torch.nn.Module
    """The peft model itself (named params for checkpoints, save_pretrained)."""
    teacher: Teacher
    """Teacher or topk.TopkTeacher: anything with kd_loss(student_logits, rows, ids, attn, labels, mask, loss_cfg)."""
    optimizer: torch.optim.Optimizer
    scheduler: object
    seqs: list[list[int]]
    pad_id: int
    device: torch.device
    resume_key: str
    trainable: int
    world: World
    engine: object = None
    """The DeepSpeed engine (strategy deepspeed): it owns backward, clipping, the step and the schedule."""
    qat: object = None
    """qat.QatState when distill.qat is enabled: the fake-quantized layers and their diagnostics."""


def load_models(ctx: Context, cfg: DistillConfig, dev: torch.device, with_teacher: bool = True):
    """(student with LoRA, frozen teacher or None, tokenizer, (teacher path, student path))."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if with_teacher or not ctx.models.student.path:
        teacher_path, student_path = resolve_models(ctx.models)
    else:  # topk: the teacher's logits come from the cache; the teacher need not exist on this machine
        teacher_path = ctx.models.teacher
        student_path = resolve_model(ctx.models.student.path, "models.student.path")
    remote = ctx.models.trust_remote_code
    dtype = getattr(torch, cfg.dtype)
    tok = AutoTokenizer.from_pretrained(student_path, trust_remote_code=remote)
    if tok.pad_token_id is None:  # many causal LMs ship without one; padding is masked out anyway
        tok.pad_token = tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(student_path, dtype=dtype, trust_remote_code=remote)
    teacher = None
    if with_teacher:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=dtype, trust_remote_code=remote)
        teacher.requires_grad_(False).eval().to(dev)
        t_vocab = teacher.get_output_embeddings().weight.shape[0]
        s_vocab = base.get_output_embeddings().weight.shape[0]
        if t_vocab != s_vocab:
            raise ValueError(f"teacher {teacher_path} has {t_vocab} output logits, student {student_path} has "
                             f"{s_vocab}: logit distillation needs the same tokenizer (pick a student of the "
                             "teacher's family, or leave models.student.path empty to derive one)")
    if cfg.qat.enabled and cfg.qat.full_finetune:  # the linear weights themselves train, no LoRA
        from refinery.train.qat import prepare_full_finetune

        return prepare_full_finetune(base, cfg.qat).to(dev), teacher, tok, (teacher_path, student_path)
    torch.manual_seed(ctx.seed)  # LoRA A init
    targets = list(cfg.lora.targets)
    if cfg.qat.enabled:  # frozen projections (ov-freeze) train nothing: no LoRA on them
        targets = [t for t in targets if t not in cfg.qat.freeze]
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        student = get_peft_model(base, lora)
    except ValueError as e:
        raise ValueError(f"distill.lora.targets {cfg.lora.targets} do not match the student's modules: {e}") from e
    return student.to(dev), teacher, tok, (teacher_path, student_path)


def setup(ctx: Context, cfg: DistillConfig) -> Setup:
    """Read data, load models, build optimizer and scheduler (nothing resumed yet)."""
    data = ctx.stage_dir("generate") / "data.jsonl"
    rows = load_rows(data)
    world = dist.init(cfg.parallel)
    if cfg.batch_size % world.size:
        raise ValueError(f"distill.batch_size={cfg.batch_size} must be a multiple of the {world.size} processes "
                         "(each rank takes an equal share of every batch)")
    dev = world.device
    topk = cfg.teacher_source == "topk"
    model, teacher_model, tok, paths = load_models(ctx, cfg, dev, with_teacher=not topk)
    seqs = tokenize_rows(rows, tok, cfg.max_seq_len)
    cut = sum(len(s) == cfg.max_seq_len for s in seqs)
    if cut:
        log.info("%d of %d examples cut to distill.max_seq_len=%d tokens", cut, len(seqs), cfg.max_seq_len)
    qat_state = None
    if cfg.qat.enabled:  # before any wrapping: DDP/FSDP2 then call the fake-quant forwards
        from refinery.train.qat import attach

        qat_state = attach(model, cfg.qat)
    if teacher_model is not None and world.strategy == "fsdp2":
        dist.shard(teacher_model, world)  # frozen weights sharded too: forward only, same ranks
    engine = None
    if world.strategy == "deepspeed":
        from refinery.train import ds

        engine = student = ds.initialize(model, cfg, world)
        optimizer, scheduler = engine.optimizer, engine.lr_scheduler
    else:
        student = dist.wrap_student(model, world)
        optimizer = build_optimizer(model, cfg.optim, distributed=world.size > 1)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    # What shapes the loss curve: a checkpoint from anything else must not be resumed. The process
    # layout does not (N ranks take the single-process step): a checkpoint from another world size
    # is then refused by name in load_checkpoint rather than deleted as stale.
    # `steps` is left out so that a finished run can be extended from its last checkpoint.
    skip = ("checkpoint_every", "keep_checkpoints", "parallel", "steps")
    shaping = hashed({k: v for k, v in to_dict(cfg).items() if k not in skip})
    ident = {"distill": shaping, "seed": ctx.seed, "models": list(paths), "data": file_hash(data)}
    if topk:
        ident["teacher_logits"] = manifest_hash(ctx.stage_dir("teacher-logits"))
    key = config_hash(ident)
    world.same_on_all(key, "the resume key (config, seed, models, data)")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if topk:  # the teacher is never loaded: its top-k logits were computed once by `teacher-logits`
        from refinery.train.topk import TopkTeacher

        teacher = TopkTeacher(ctx.stage_dir("teacher-logits"), seqs, cfg, dev)
    else:
        teacher = Teacher(teacher_model, seqs, tok.pad_token_id, dev, cache=cfg.teacher_cache)
    return Setup(student, model, teacher, optimizer, scheduler, seqs, tok.pad_token_id, dev, key, trainable, world,
                 engine, qat_state)


def train_step(s: Setup, cfg: DistillConfig, step: int, seed: int) -> dict:
    """One optimizer step (grad_accum micro-batches of batch_size); returns its metrics row.

    With N processes each takes every N-th example of each batch and scales its token-mean
    loss by its share of the batch's tokens, so the averaged gradient is the single-process one.
    """
    t0 = time.perf_counter()
    w = s.world
    sums = [0.0, 0.0, 0.0, 0.0]  # this rank's share of loss, kd, ce (batch token means); its tokens
    for micro in range(cfg.grad_accum):
        start = ((step - 1) * cfg.grad_accum + micro) * cfg.batch_size
        idx = sample_indices(len(s.seqs), seed, start, cfg.batch_size)[w.rank::w.size]
        ids, attn = collate([s.seqs[i] for i in idx], s.pad_id)
        ids, attn = ids.to(s.device), attn.to(s.device)
        s_logits = s.student(input_ids=ids, attention_mask=attn).logits
        # KD on every non-pad position, prompt included: the teacher's full next-token
        # distribution is signal everywhere (not only on the answer), our data is small, and
        # the evaluation scores text in this same prompt format.
        # Position t predicts token t+1: shift the targets, not the (vocab-sized) logits.
        labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
        counted = torch.cat([attn[:, 1:], torch.zeros_like(attn[:, :1])], 1).bool()
        out = s.teacher.kd_loss(s_logits, idx, ids, attn, labels, counted, cfg.loss)
        n = int(counted.sum())
        frac = n / w.sum([n])[0]  # this rank's share of the batch's counted tokens
        if s.engine is not None:  # DeepSpeed divides by grad_accum and steps at the boundary itself
            s.engine.backward(out.loss * (frac * w.size))
            lrs = _lrs(s.optimizer)
            s.engine.step()
        else:
            (out.loss * (frac * w.size) / cfg.grad_accum).backward()  # DDP / FSDP2 average over ranks
        for k, part in enumerate((out.loss, out.kd, out.ce)):
            sums[k] += part.item() * frac / cfg.grad_accum
        sums[3] += int(attn.sum())
    loss, kd, ce, tokens = w.sum(sums)
    if s.engine is not None:
        grad_norm = float(s.engine.get_global_grad_norm() or 0.0)
    else:
        params = [p for g in s.optimizer.param_groups for p in g["params"]]
        clip = cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf)
        grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        lrs = _lrs(s.optimizer)
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    if not math.isfinite(loss):
        raise FloatingPointError(f"distill: loss is {loss} at step {step}; lower distill.optim.lr "
                                 "(or adamw_lr) or set distill.optim.grad_clip")
    return {"step": step, "loss": round(loss, 6), "kd": round(kd, 6), "ce": round(ce, 6), **lrs,
            "grad_norm": round(grad_norm, 6), "tokens": int(tokens), "tokens_per_s": round(tokens / dt, 1),
            "step_s": round(dt, 4)}


def _lrs(optimizer) -> dict:
    """The learning rates this step uses, by group kind (Muon groups: lr, AdamW groups: adamw_lr)."""
    return {("adamw_lr" if g.get("use_muon") is False else "lr"): g["lr"] for g in optimizer.param_groups}


def _resume(s: Setup, cfg: DistillConfig, out: Path) -> int:
    """Load the newest matching checkpoint and cut metrics.jsonl back to it; return its step."""
    root, metrics = out / "checkpoints", out / "metrics.jsonl"
    latest = [None]
    if s.world.main:  # one rank decides (and removes stale or torn checkpoints), all load the same one
        ckpt.clean(root, cfg.keep_checkpoints)
        latest = [ckpt.latest_checkpoint(root, s.resume_key, cfg.steps)]
    if s.world.size > 1:
        torch.distributed.broadcast_object_list(latest, src=0)
    start = 0
    if latest[0] is not None:
        if s.world.size > 1:
            ckpt.check_visible(latest[0], s.world)
        state = ckpt.load_checkpoint(latest[0], s.model, s.optimizer, s.scheduler, s.world)
        start = state["step"]
        log.info("distill: resumed from %s (step %d of %d)", latest[0], start, cfg.steps)
        made_for = state.get("steps", cfg.steps)
        if made_for != cfg.steps:
            log.warning("distill: extending a run made for %d steps to %d: steps %d-%d follow the %d-step "
                        "learning-rate schedule from where it stands (a fresh %d-step run would differ)",
                        made_for, cfg.steps, start + 1, cfg.steps, cfg.steps, cfg.steps)
    if s.world.main:  # rows past the checkpoint (written before a kill) are dropped: they will be redone
        write_jsonl(metrics, [r for r in read_jsonl_prefix(metrics) if r["step"] <= start])
        diag = out / "qat_diagnostics.jsonl"
        if diag.is_file():
            write_jsonl(diag, [r for r in read_jsonl_prefix(diag) if r["step"] <= start and s.qat is not None])
    return start


def _summary(rows: list[dict], s: Setup, cfg: DistillConfig, wall: float) -> dict:
    losses = [r["loss"] for r in rows]
    head, tail = losses[:10], losses[-10:]
    train_s = sum(r["step_s"] for r in rows)
    return {"steps": len(rows), "first_loss": round(sum(head) / len(head), 6),
            "last_loss": round(sum(tail) / len(tail), 6), "last_kd": rows[-1]["kd"], "last_ce": rows[-1]["ce"],
            "tokens_per_s": round(sum(r["tokens"] for r in rows) / max(train_s, 1e-9), 1),
            "s_per_step": round(train_s / len(rows), 3), "wall_s": round(wall, 1),
            "trainable_params": s.trainable, "optimizer": cfg.optim.name}


def train(ctx: Context, cfg: DistillConfig, *, stop_after: int | None = None) -> Result:
    """Train the LoRA student by KD and save `distill/adapter/` (in each process of a distributed job).

    `stop_after`: stop once this step is done and checkpointed, without saving the adapter
    (a later `run` resumes there); for time-sliced jobs and the resume tests.
    """
    from tqdm import tqdm

    t_start = time.time()
    out = ctx.stage_dir("distill")
    out.mkdir(parents=True, exist_ok=True)
    s = setup(ctx, cfg)
    start = _resume(s, cfg, out)
    s.student.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    root = out / "checkpoints"
    main = s.world.main
    log.info("distill: %d trainable params, %s, steps %d -> %d on %s x %d (%s)", s.trainable, cfg.optim.name,
             start, end, s.device, s.world.size, s.world.strategy)
    diag_path = out / "qat_diagnostics.jsonl" if main and s.qat is not None else os.devnull
    with StopFlag() as stop, (out / "metrics.jsonl").open("a") if main else open(os.devnull, "w") as f, \
            open(diag_path, "a") as diag, \
            tqdm(total=cfg.steps, initial=start, desc="distill", unit="step", mininterval=2,
                 disable=not main) as bar:
        for step in range(start + 1, end + 1):
            if s.qat is not None:
                s.qat.recording = s.qat.due(step)
            row = train_step(s, cfg, step, ctx.seed)
            f.write(json.dumps(row) + "\n")
            f.flush()
            if s.qat is not None and s.qat.recording:  # this rank's gradients (before the DDP average)
                diag.writelines(json.dumps(r) + "\n" for r in s.qat.rows(step))
                diag.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            signum = int(s.world.sum([float(stop.signum or 0)])[0])  # any rank signalled: all stop here
            if step % cfg.checkpoint_every == 0 or step == end or signum:
                samples = step * cfg.grad_accum * cfg.batch_size
                ckpt.save_checkpoint(root, step, s.model, s.optimizer, s.scheduler,
                                     {"samples_seen": samples, "resume_key": s.resume_key, "steps": cfg.steps}, s.world)
                if main:
                    ckpt.clean(root, cfg.keep_checkpoints)
            if signum and step < end:
                log.warning("distill: signal %d: checkpointed step %d, stopping", signum, step)
                raise Preempted(step, stop.signum or signal.SIGTERM)
    s.world.barrier()
    rows = read_jsonl(out / "metrics.jsonl")
    metrics = _summary(rows, s, cfg, time.time() - t_start) if rows else {"steps": 0}
    metrics.update(world_size=s.world.size, strategy=s.world.strategy)
    if s.world.hosts:  # where each rank ran (several hosts: a multi-node job)
        metrics["hosts"] = s.world.hosts
    if end < cfg.steps:
        return Result({**metrics, "stopped_at": end}, ["metrics.jsonl", "checkpoints"])
    full = cfg.qat.enabled and cfg.qat.full_finetune
    saved, stale = ("model", "adapter") if full else ("adapter", "model")
    (save_model if full else save_adapter)(s, out / saved)
    if main and (out / stale).is_dir():  # quantize picks model/ or adapter/: never one from an older run
        import shutil

        shutil.rmtree(out / stale)
    outputs = [saved, "metrics.jsonl"]  # checkpoints/ is for resuming, not a product: not verified on skip
    if main:
        outputs += _qat_outputs(s, cfg, out)
    log.info("distill: loss %.4f -> %.4f over %d steps; %s in %s", metrics["first_loss"],
             metrics["last_loss"], metrics["steps"], saved, out / saved)
    return Result(metrics, outputs)


def _qat_outputs(s: Setup, cfg: DistillConfig, out: Path) -> list[str]:
    """qat.json (the grid quantize.method=qat_rtn exports with) and the diagnostics plots; a plain
    run removes a qat.json an earlier QAT run left, so the export never uses a stale grid."""
    from refinery.train import qat

    spec = out / qat.SPEC
    if s.qat is None:
        spec.unlink(missing_ok=True)
        return []
    qat.write_spec(spec, cfg.qat, cfg.dtype)
    rows = read_jsonl(out / qat.DIAGNOSTICS) if (out / qat.DIAGNOSTICS).is_file() else []
    return [qat.SPEC] + ([qat.DIAGNOSTICS] if rows else []) + qat.plot_diagnostics(rows, out)


def save_adapter(s: Setup, path: Path) -> None:
    """The consolidated LoRA adapter (peft format), from any strategy: shards gathered, rank 0 writes."""
    trainable = [(n, p) for n, p in s.model.named_parameters() if p.requires_grad]
    gather = contextlib.nullcontext()
    if s.engine is not None and s.engine.zero_optimization_stage() == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in trainable])
    with gather:
        full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone() for n, p in trainable}
    if s.world.main:
        with atomic_path(path) as tmp:
            s.model.save_pretrained(tmp, state_dict=full)
    s.world.barrier()


def save_model(s: Setup, path: Path) -> None:
    """distill.qat.full_finetune: the whole student as an HF checkpoint (trained linears float32, the
    rest in distill.dtype), gathered from shards; rank 0 writes."""
    full = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()
            for n, t in s.model.state_dict().items()}
    if s.world.main:
        with atomic_path(path) as tmp:
            s.model.save_pretrained(tmp, state_dict=full)
    s.world.barrier()
