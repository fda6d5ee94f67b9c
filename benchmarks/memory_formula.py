"""Bytes per rank of a distill job, from the formula of docs/memory.md, checked against this machine.

    python benchmarks/memory_formula.py                 # formula vs measured, quickstart models, 10 steps
    python benchmarks/memory_formula.py --batch 24 --steps 6   # 3x the tokens per step
    python benchmarks/memory_formula.py --table 13b     # the docs/memory.md table (13B teacher, 8 ranks)

`memory_per_rank` is the formula (importable). The check runs the quickstart distill setup and 10
training steps, each teacher source in its own process, and reads the process's resident memory
from /proc/self/status: baseline after imports, after setup (models, teacher cache, optimizer),
and the peak during the steps (VmHWM, reset after setup through /proc/self/clear_refs). torch has
no allocator statistics for CPU tensors (they come from malloc), so RSS is what there is; it also
counts what the formula leaves out (allocator slack, thread scratch, Python objects).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
TOPK = ["distill.teacher_source=topk", "teacher_logits.dtype=bfloat16"]  # bf16 teacher, as the live one runs
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: shapes are all the formula needs."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def kv_width(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden

    def params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params() + embed + self.hidden


SMOLLM2_135M = Shape(30, 576, 1536, 49152, 9, 3, tied=True)
STUDENT_12L = Shape(12, 576, 1536, 49152, 9, 3, tied=True)          # quickstart: 12 of the 30 layers
LLAMA2_13B = Shape(40, 5120, 13824, 32000, 40, 40)
SHEARED_LLAMA_2_7B = Shape(32, 2560, 6912, 32000, 20, 20)          # Llama-2 tokenizer: same vocab as the 13B
LLAMA32_3B = Shape(28, 3072, 8192, 128256, 24, 8, tied=True)
STRATEGIES = ("none", "ddp", "fsdp2", "zero2", "zero3")


def memory_per_rank(student: Shape, teacher: Shape | None = None, *, world: int = 1, strategy: str = "none",
                    weight_bytes: int = 2, act_bytes: int = 2, lora_r: int = 16,
                    lora_targets: tuple[str, ...] = ALL_TARGETS, optimizer: str = "muon", batch: int = 8,
                    seq_len: int = 192, teacher_source: str = "live", cache_tokens: int = 0, k: int = 64,
                    value_bytes: int = 2, bucket_elems: int = 500_000_000) -> dict[str, float]:
    """Bytes per rank of LoRA distillation, by part (see docs/memory.md for each term).

    batch: sequences per optimizer step over all ranks (each rank takes batch / world), seq_len:
    padded width. teacher_source live: the teacher is in memory (with its hidden-state cache when
    cache_tokens > 0, else it runs every step); topk: the teacher is not loaded, the cached top-k
    logits of cache_tokens positions are read from memory-mapped files. Frozen weights and
    activations in weight_bytes / act_bytes; LoRA weights, grads and optimizer state in fp32.
    """
    assert strategy in STRATEGIES and (strategy != "none" or world == 1)
    shard_params = strategy in ("fsdp2", "zero3")
    shard_state = strategy in ("fsdp2", "zero2", "zero3")
    tokens = batch / world * seq_len
    lora = student.layers * sum(lora_r * (a + b) for n, (a, b) in student.linears().items() if n in lora_targets)
    live = teacher is not None and teacher_source == "live"
    out = {}
    # frozen weights; only fsdp2 shards the teacher (deepspeed does not get the teacher)
    out["teacher weights"] = teacher.params() * weight_bytes / (world if strategy == "fsdp2" else 1) if live else 0
    out["teacher hidden cache"] = 0
    if live and cache_tokens:  # every rank keeps all examples, plus a full copy of a sharded lm_head
        head = teacher.vocab * teacher.hidden * weight_bytes if strategy == "fsdp2" else 0
        out["teacher hidden cache"] = cache_tokens * teacher.hidden * act_bytes + head
    out["top-k cache (mmap)"] = cache_tokens * (k * (value_bytes + 4) + 4) if teacher_source == "topk" else 0
    out["student frozen weights"] = student.params() * weight_bytes / (world if shard_params else 1)
    out["LoRA params"] = lora * 4 / (world if shard_params else 1)
    out["LoRA grads"] = lora * 4 / (world if shard_state else 1)
    # DDP all-reduces from bucket copies of the grads; ZeRO reduces through buckets of <= bucket_elems
    out["grad buckets"] = {"ddp": lora * 4, "zero2": min(lora, bucket_elems) * 4,
                           "zero3": min(lora, bucket_elems) * 4}.get(strategy, 0)
    out["optimizer state"] = lora * 4 * {"muon": 1, "adamw": 2}[optimizer] / (world if shard_state else 1)
    out["gathered params"] = 0
    if shard_params:  # one layer in use + one prefetched, and the root unit (embeddings, head); the
        # teacher's only while it runs: every step without its hidden cache, else only at setup
        models = [student] + ([teacher] if live and not cache_tokens and strategy == "fsdp2" else [])
        out["gathered params"] = max(2 * m.layer_params() + m.vocab * m.hidden * (1 if m.tied else 2)
                                     for m in models) * weight_bytes
    out["activations"] = tokens * student.layers * saved_per_token_layer(student, lora_targets, lora_r, act_bytes)
    # in backward: the student's logits, the fused loss's saved gradient, its scaled copy and the
    # logits' gradient (in forward the live teacher's logits take the place of the last two)
    out["vocab-sized logits"] = 4 * tokens * student.vocab * act_bytes
    if teacher_source == "topk":
        out["vocab-sized logits"] += tokens * (k * (4 + 8) + 4)  # the batch's values, indices, tails
    elif live and not cache_tokens:  # the teacher's forward, no grad: a layer's MLP and residual at a time
        out["vocab-sized logits"] += tokens * (2 * teacher.hidden + 4 * teacher.intermediate) * act_bytes
    out["total"] = sum(out.values())
    return out


def saved_per_token_layer(m: Shape, targets: tuple[str, ...], r: int, act_bytes: int) -> int:
    """Bytes autograd keeps per token and layer with a frozen base and LoRA on `targets`.

    RMSNorm upcasts its input to fp32 (2 norms x 4h); each LoRA module keeps its own fp32 copy of
    its input (peft casts x to the adapter dtype) and its r-wide hidden; flash SDPA keeps q, k, v
    (k, v repeated to full width under a padding mask) and its output; the MLP keeps gate, up and
    silu(gate). Frozen linears keep nothing (no weight grad). No L^2 attention term (flash kernel).
    """
    lin = m.linears()
    lora = sum(4 * lin[t][0] + 4 * r for t in targets)
    return 8 * m.hidden + lora + act_bytes * (4 * m.hidden + 3 * m.intermediate)


def table_13b(student: Shape = SHEARED_LLAMA_2_7B, cache_tokens: int = 600 * 512) -> list[str]:
    cols = [("ddp", "live"), ("fsdp2", "live"), ("zero2", "live"), ("zero3", "live"), ("ddp", "topk"),
            ("fsdp2", "topk")]
    res = [memory_per_rank(student, LLAMA2_13B, world=8, strategy=s, teacher_source=src, batch=8, seq_len=2048,
                           cache_tokens=cache_tokens) for s, src in cols]
    head = "| GB per rank | " + " | ".join(f"{s} {'top-k' if src == 'topk' else ''}".strip() for s, src in cols) + " |"
    rows = [head, "|---|" + "---:|" * len(cols)]
    for part in res[0]:
        cells = [f"{r[part] / GB:.2f}" for r in res]
        rows.append(f"| {'**total**' if part == 'total' else part} | "
                    + " | ".join(f"**{c}**" if part == "total" else c for c in cells) + " |")
    return rows


# ----- the check on this machine -----

def rss_kb(field: str = "VmRSS") -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure(source: str, run_dir: str, steps: int, batch: int | None) -> dict:
    """In this process: baseline after imports, RSS after setup, peak RSS over `steps` steps, and the
    bytes autograd saves in one forward of the widest batch (torch's own count, via saved-tensor hooks)."""
    import gc

    import peft  # noqa: F401  (imports counted in the baseline)
    import torch
    import transformers  # noqa: F401

    from refinery.pipeline.config import load
    from refinery.train.data import collate, sample_indices
    from refinery.train.trainer import setup, train_step

    cfg = load("configs/quickstart.yaml", [f"run_dir={run_dir}", f"distill.steps={steps}"]
               + ([f"distill.batch_size={batch}"] if batch else []) + (TOPK if source == "topk" else []))
    trim = ctypes.CDLL("libc.so.6").malloc_trim  # freed heap pages back to the OS: RSS = live memory
    gc.collect()
    trim(0)
    base = rss_kb()
    s = setup(cfg.context(), cfg.distill)
    load_peak = rss_kb("VmHWM")
    gc.collect()
    trim(0)  # the load's fp32 -> bf16 copies are freed but malloc keeps them until trimmed
    after_setup = rss_kb()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    d, batches = cfg.distill, []
    for step in range(1, steps + 1):
        batches.append(sample_indices(len(s.seqs), cfg.seed, (step - 1) * d.batch_size, d.batch_size))
        train_step(s, d, step, cfg.seed)
    train_peak = rss_kb("VmHWM")
    widest = max(batches, key=lambda idx: max(len(s.seqs[i]) for i in idx))
    ids, attn = collate([s.seqs[i] for i in widest], s.pad_id)
    params = {t.untyped_storage().data_ptr() for t in [*s.model.parameters(), *s.model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s.student(input_ids=ids, attention_mask=attn)
    gb = 1024 / GB
    return {"baseline_gb": base * gb, "load_peak_gb": (load_peak - base) * gb, "setup_gb": (after_setup - base) * gb,
            "train_peak_gb": (train_peak - base) * gb, "saved_gb": sum(saved.values()) / GB,
            "width": ids.shape[1], "data_tokens": sum(map(len, s.seqs)), "batch": d.batch_size}


def compare(src: str, run_dir: str, steps: int, batch: int | None) -> list[str]:
    rd = Path(run_dir)
    if not (rd / "generate" / "manifest.json").is_file():
        shutil.rmtree(rd, ignore_errors=True)
        rd.mkdir(parents=True)
        shutil.copytree(Path(src) / "generate", rd / "generate")
    subprocess.run([sys.executable, "-m", "refinery.launch.cli", "teacher-logits", "configs/quickstart.yaml",
                    f"run_dir={run_dir}", *TOPK], check=True)  # the top-k cache (skipped when complete)
    rows = ["| teacher source | part | predicted GB | measured GB | measured / predicted |", "|---|---|---:|---:|---:|"]
    dynamic = ("LoRA grads", "optimizer state", "activations", "vocab-sized logits")
    for source in ("live", "topk"):  # each in a fresh process: its memory is its own
        out = subprocess.run([sys.executable, __file__, "--measure", source, "--run-dir", run_dir, "--steps", str(steps)]
                             + (["--batch", str(batch)] if batch else []), check=True, capture_output=True,
                             text=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
        p = {k: v / GB for k, v in memory_per_rank(STUDENT_12L, SMOLLM2_135M, batch=m["batch"], seq_len=m["width"],
                                                   teacher_source=source, cache_tokens=m["data_tokens"]).items()}
        static = p["total"] - sum(p[k] for k in dynamic)
        for part, pred, meas in (("after setup: weights, caches (RSS)", static, m["setup_gb"]),
                                 ("activations (autograd saved tensors)", p["activations"], m["saved_gb"]),
                                 ("training: peak - after setup (RSS)", p["total"] - static,
                                  m["train_peak_gb"] - m["setup_gb"]),
                                 ("**peak in training (RSS)**", p["total"], m["train_peak_gb"])):
            rows.append(f"| {source} | {part} | {pred:.3f} | {meas:.3f} | {meas / pred:.2f} |")
        print(f"{source}: baseline after imports {m['baseline_gb']:.2f} GB; over it: peak while loading "
              f"{m['load_peak_gb']:.2f} GB; batch {m['batch']} x widest {m['width']} tokens; data "
              f"{m['data_tokens']} tokens; predicted (GB): " + ", ".join(f"{k} {v:.3f}" for k, v in p.items() if v))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=["13b"], help="print the docs/memory.md table and exit")
    p.add_argument("--from", dest="src", default="runs/bench-quickstart", help="a finished run whose generate/ is reused")
    p.add_argument("--run-dir", default="runs/memory-formula")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, help="distill.batch_size (default: the config's, 8)")
    p.add_argument("--measure", choices=["live", "topk"], help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.table:
        print("\n".join(table_13b()))
        return 0
    if args.measure:
        print(json.dumps(measure(args.measure, args.run_dir, args.steps, args.batch)))
        return 0
    print("\n".join(compare(args.src, args.run_dir, args.steps, args.batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
