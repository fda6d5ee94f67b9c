"""TRL's GKD trainer on batches fixed by the caller. Runs in the TRL venv (benchmarks/peers/peer_env.py),
started by benchmarks/peers/distill_vs_peers.py; it imports nothing of ours.

    <trl venv>/bin/python trl_distill_run.py --teacher T --student S --batches B.json --out DIR [...]

`--batches` holds one list of token-id lists per optimizer step (the exact batches our distill stage
draws, seed and order included). TRL gets them through a data collator of ours and a sequential
sampler: the collator returns input_ids, attention_mask and labels = input_ids with padding set to
-100, so GKD's forward KL counts the same positions as ours (every real token, prompt included).
GKD: lmbda=0 (the dataset's sequences, no on-policy generation), beta=0 (forward KL). GKDTrainer's
compute_loss does not pass `temperature` to its loss (TRL 1.16: it only shapes sampling), so its KL is
at temperature 1; the caller runs ours at temperature 1 too. Writes DIR/metrics.json and DIR/adapter.
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("--teacher", "--student", "--batches", "--out"):
        p.add_argument(name, required=True)
    p.add_argument("--pad-id", type=int, required=True)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    return p.parse_args(argv)


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids, attention_mask, and labels = input_ids with padding at -100."""
    width = max(len(it["ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, :len(it["ids"])] = torch.tensor(it["ids"])
        mask[i, :len(it["ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def gkd_config(args, steps: int, size: int):
    """GKD with lmbda 0 (the dataset's sequences) and beta 0 (forward KL), AdamW as ours runs it."""
    from trl.experimental.gkd import GKDConfig

    return GKDConfig(output_dir=str(Path(args.out) / "trainer"), lmbda=0.0, beta=0.0, max_steps=steps,
                     per_device_train_batch_size=size, learning_rate=args.lr, lr_scheduler_type="cosine",
                     warmup_steps=args.warmup_steps, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
                     max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                     use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
                     remove_unused_columns=False,
                     # SFTConfig's defaults are gradient_checkpointing=True and bf16=True (autocast): off,
                     # as in ours (no recomputation; bf16 weights loaded as such, LoRA in fp32)
                     gradient_checkpointing=False, bf16=False)


def main(argv=None) -> None:
    args = parse(argv)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDTrainer

    batches = json.loads(Path(args.batches).read_text())
    size = len(batches[0])
    rows = [{"ids": seq} for batch in batches for seq in batch]  # in step order

    class Sequential(GKDTrainer):
        def _get_train_sampler(self, *a, **k):  # our batch order, not a reshuffle
            return torch.utils.data.SequentialSampler(self.train_dataset)

    steps, losses, t_steps = [], [], []

    class Record(TrainerCallback):
        def on_step_begin(self, *a, **k):
            t_steps.append(time.perf_counter())

        def on_log(self, _args, state, _control, logs=None, **k):
            if logs and "loss" in logs:
                steps.append(state.global_step)
                losses.append(float(logs["loss"]))

    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    trainer = Sequential(model=student, teacher_model=teacher, args=gkd_config(args, len(batches), size),
                         data_collator=partial(collate, pad_id=args.pad_id),
                         train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Record()],
                         peft_config=LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                target_modules=targets, task_type="CAUSAL_LM"))
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    trainer.model.save_pretrained(Path(args.out) / "adapter")
    tokens = sum(len(s) for b in batches for s in b)
    # steady state: from the start of step 2 to the end (the first step pays one-off warm-up)
    steady = wall - (t_steps[1] - t0) if len(t_steps) > 1 else wall
    steady_tokens = tokens - sum(len(s) for s in batches[0])
    Path(args.out, "metrics.json").write_text(json.dumps({
        "steps": steps, "losses": losses, "train_s": round(wall, 2), "train_runtime": out.metrics.get("train_runtime"),
        "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
        "steady_tokens_per_s": round(steady_tokens / steady, 1)}, indent=1))


if __name__ == "__main__":
    main()
