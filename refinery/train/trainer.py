"""The `distill` stage: LoRA student trained on the frozen teacher's softened logits.

    refinery distill configs/quickstart.yaml [distill.steps=50 ...]

setup (data, models, optimizer) -> resume from the newest checkpoint -> train (checkpoint
every `checkpoint_every` steps, metrics.jsonl row per step) -> save the adapter. Killed or
preempted runs call the same `run` again and continue on the same loss curve.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from refinery.core.config import config_hash, to_dict
from refinery.core.manifest import atomic_path, file_hash, manifest_hash, read_jsonl, write_jsonl
from refinery.core.models import resolve_models
from refinery.core.stage import Context, Result
from refinery.train import checkpoint as ckpt
from refinery.train.config import DistillConfig
from refinery.train.data import collate, load_rows, sample_indices, tokenize_rows
from refinery.train.muon import build_optimizer, build_scheduler
from refinery.train.teacher import Teacher

log = logging.getLogger("refinery.train")


@dataclass
class Setup:
    """Everything the loop needs, built once per invocation."""

    student: torch.nn.Module
    teacher: Teacher
    """Teacher or topk.TopkTeacher: anything with kd_loss(student_logits, rows, ids, attn, labels, mask, loss_cfg)."""
    optimizer: torch.optim.Optimizer
    scheduler: object
    seqs: list[list[int]]
    pad_id: int
    device: torch.device
    resume_key: str
    trainable: int


def device() -> torch.device:
    """cuda when present, else cpu. (A distributed run will pick cuda:LOCAL_RANK here.)"""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_models(ctx: Context, cfg: DistillConfig, dev: torch.device, with_teacher: bool = True):
    """(student with LoRA, frozen teacher or None, tokenizer, (teacher path, student path))."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_path, student_path = resolve_models(ctx.models)
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
    torch.manual_seed(ctx.seed)  # LoRA A init
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.targets), task_type="CAUSAL_LM")
    try:
        student = get_peft_model(base, lora)
    except ValueError as e:
        raise ValueError(f"distill.lora.targets {cfg.lora.targets} do not match the student's modules: {e}") from e
    return student.to(dev), teacher, tok, (teacher_path, student_path)


def setup(ctx: Context, cfg: DistillConfig) -> Setup:
    """Read data, load models, build optimizer and scheduler (nothing resumed yet)."""
    data = ctx.stage_dir("generate") / "data.jsonl"
    rows = load_rows(data)
    dev = device()
    topk = cfg.teacher_source == "topk"
    student, teacher_model, tok, paths = load_models(ctx, cfg, dev, with_teacher=not topk)
    seqs = tokenize_rows(rows, tok, cfg.max_seq_len)
    cut = sum(len(s) == cfg.max_seq_len for s in seqs)
    if cut:
        log.info("%d of %d examples cut to distill.max_seq_len=%d tokens", cut, len(seqs), cfg.max_seq_len)
    optimizer = build_optimizer(student, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    # What shapes the loss curve: a checkpoint from anything else must not be resumed.
    shaping = {k: v for k, v in to_dict(cfg).items() if k not in ("checkpoint_every", "keep_checkpoints")}
    ident = {"distill": shaping, "seed": ctx.seed, "models": list(paths), "data": file_hash(data)}
    if topk:
        ident["teacher_logits"] = manifest_hash(ctx.stage_dir("teacher-logits"))
    key = config_hash(ident)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    if topk:  # the teacher is never loaded: its top-k logits were computed once by `teacher-logits`
        from refinery.train.topk import TopkTeacher

        teacher = TopkTeacher(ctx.stage_dir("teacher-logits"), seqs, cfg, dev)
    else:
        teacher = Teacher(teacher_model, seqs, tok.pad_token_id, dev, cache=cfg.teacher_cache)
    return Setup(student, teacher, optimizer, scheduler, seqs, tok.pad_token_id, dev, key, trainable)


def train_step(s: Setup, cfg: DistillConfig, step: int, seed: int) -> dict:
    """One optimizer step (grad_accum micro-batches of batch_size); returns its metrics row."""
    t0 = time.perf_counter()
    totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
    tokens = 0
    for micro in range(cfg.grad_accum):
        start = ((step - 1) * cfg.grad_accum + micro) * cfg.batch_size
        idx = sample_indices(len(s.seqs), seed, start, cfg.batch_size)
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
        (out.loss / cfg.grad_accum).backward()
        for k in totals:
            totals[k] += getattr(out, k).item() / cfg.grad_accum
        tokens += int(attn.sum())
    params = [p for g in s.optimizer.param_groups for p in g["params"]]
    clip = cfg.optim.grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf).item()
    lrs = {("adamw_lr" if g.get("use_muon") is False else "lr"): g["lr"] for g in s.optimizer.param_groups}
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    if not math.isfinite(totals["loss"]):
        raise FloatingPointError(f"distill: loss is {totals['loss']} at step {step}; lower distill.optim.lr "
                                 "(or adamw_lr) or set distill.optim.grad_clip")
    return {"step": step, **{k: round(v, 6) for k, v in totals.items()}, **lrs,
            "grad_norm": round(grad_norm, 6), "tokens": tokens, "tokens_per_s": round(tokens / dt, 1),
            "step_s": round(dt, 4)}


def _resume(s: Setup, cfg: DistillConfig, out: Path) -> int:
    """Load the newest matching checkpoint and cut metrics.jsonl back to it; return its step."""
    root, metrics = out / "checkpoints", out / "metrics.jsonl"
    ckpt.clean(root, cfg.keep_checkpoints)
    latest = ckpt.latest_checkpoint(root, s.resume_key)
    start = 0
    if latest is not None:
        start = ckpt.load_checkpoint(latest, s.student, s.optimizer, s.scheduler)["step"]
        log.info("distill: resumed from %s (step %d of %d)", latest, start, cfg.steps)
    # Rows past the checkpoint (written before a kill) are dropped: they will be redone.
    write_jsonl(metrics, [r for r in _read_rows(metrics) if r["step"] <= start])
    return start


def _read_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a killed writer
                break
    return rows


def _summary(rows: list[dict], s: Setup, cfg: DistillConfig, wall: float) -> dict:
    losses = [r["loss"] for r in rows]
    head, tail = losses[:10], losses[-10:]
    train_s = sum(r["step_s"] for r in rows)
    return {"steps": len(rows), "first_loss": round(sum(head) / len(head), 6),
            "last_loss": round(sum(tail) / len(tail), 6), "last_kd": rows[-1]["kd"], "last_ce": rows[-1]["ce"],
            "tokens_per_s": round(sum(r["tokens"] for r in rows) / max(train_s, 1e-9), 1),
            "s_per_step": round(train_s / len(rows), 3), "wall_s": round(wall, 1),
            "trainable_params": s.trainable, "optimizer": cfg.optim.name}


def run(ctx: Context, cfg: DistillConfig, *, stop_after: int | None = None) -> Result:
    """Train the LoRA student by KD and save `distill/adapter/`.

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
    log.info("distill: %d trainable params, %s, steps %d -> %d on %s", s.trainable, cfg.optim.name,
             start, end, s.device)
    with (out / "metrics.jsonl").open("a") as f, \
            tqdm(total=cfg.steps, initial=start, desc="distill", unit="step", mininterval=2) as bar:
        for step in range(start + 1, end + 1):
            row = train_step(s, cfg, step, ctx.seed)
            f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if step % cfg.checkpoint_every == 0 or step == end:
                samples = step * cfg.grad_accum * cfg.batch_size
                ckpt.save_checkpoint(root, step, s.student, s.optimizer, s.scheduler,
                                     {"samples_seen": samples, "resume_key": s.resume_key})
                ckpt.clean(root, cfg.keep_checkpoints)
    rows = read_jsonl(out / "metrics.jsonl")
    metrics = _summary(rows, s, cfg, time.time() - t_start) if rows else {"steps": 0}
    if end < cfg.steps:
        return Result({**metrics, "stopped_at": end}, ["metrics.jsonl", "checkpoints"])
    with atomic_path(out / "adapter") as tmp:
        s.student.save_pretrained(tmp)
    log.info("distill: loss %.4f -> %.4f over %d steps; adapter in %s", metrics["first_loss"],
             metrics["last_loss"], metrics["steps"], out / "adapter")
    return Result(metrics, ["adapter", "metrics.jsonl", "checkpoints"])
