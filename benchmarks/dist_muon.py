"""Optimizer step time under 2-rank FSDP2: our DistMuon vs AdamW vs torch.optim.Muon on DTensor,
and Newton-Schulz GFLOP/s vs a plain matmul of the same shape.

    python benchmarks/dist_muon.py [--nproc 2] [--repeats 10]

Re-launches itself under torchrun (gloo on CPU, NCCL on GPU). Same model, same gradients, same
process group for all three optimizers: the 12-layer SmolLM2 student of the quickstart, with
(a) its LoRA adapter (r=16 on q,k,v,o,gate,up,down: 168 small matrices) and (b) full fine-tuning
of its 84 linear weights. Only the 2-D params Muon takes are stepped.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _params(kind: str):
    """FSDP2-sharded student; returns (model, the 2-D trainable params) with real gradients in them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from refinery.core.models import derive_student, smollm2_dir
    from refinery.train.dist import World, shard
    from refinery.train.optim import split_params

    path = derive_student(str(smollm2_dir()), 12)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    if kind == "lora":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    else:
        for n, p in model.named_parameters():
            p.requires_grad_(p.ndim == 2 and "embed" not in n and "lm_head" not in n)
    world = World(dist.get_rank(), dist.get_world_size(), strategy="fsdp2")
    shard(model, world)
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    if kind == "lora":  # B starts at 0, so A has no gradient yet: give both a real-scale one
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p.grad.add_(torch.randn_like(p.grad) * 1e-3)
    muon, _ = split_params(model)
    return model, [p for _, p in muon]


def _time(opt, repeats: int) -> list[float]:
    opt.step()  # warm-up (state allocation)
    out = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        opt.step()
        dist.barrier()
        out.append(time.perf_counter() - t)
    return out


def bench_step(kind: str, repeats: int) -> list[tuple[str, float, float]]:
    from refinery.train.dist_muon import DistMuon

    _, params = _params(kind)
    saved = [p.detach().clone() for p in params]
    rows = []
    for name, make in [("AdamW (torch)", lambda: torch.optim.AdamW(params, lr=1e-4)),
                       ("DistMuon (ours)", lambda: DistMuon(params, lr=1e-3)),
                       ("torch.optim.Muon on DTensor", lambda: torch.optim.Muon(params, lr=1e-3))]:
        times = _time(make(), repeats)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        rows.append((name, statistics.median(times) * 1e3, min(times) * 1e3))
    return rows


def bench_ns(repeats: int) -> list[tuple]:
    """Newton-Schulz (5 iterations, bf16) vs one bf16 matmul with the same (m, n) operand, single process."""
    from refinery.train.muon import newton_schulz

    out = []
    for m, n in [(576, 576), (576, 1536), (16, 576), (1536, 4096)]:
        x = torch.randn(m, n)
        small, big = min(m, n), max(m, n)
        ns_flops = 5 * (4 * small * small * big + 2 * small ** 3)
        a, b = torch.randn(small, big, dtype=torch.bfloat16), torch.randn(big, small, dtype=torch.bfloat16)
        mm_flops = 2 * small * small * big
        newton_schulz(x)
        a @ b
        t_ns = min(_wall(lambda: newton_schulz(x)) for _ in range(repeats))
        t_mm = min(_wall(lambda: a @ b) for _ in range(repeats))
        out.append((f"{m}x{n}", ns_flops / t_ns / 1e9, mm_flops / t_mm / 1e9, t_ns * 1e3))
    return out


def _wall(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    if "LOCAL_RANK" not in os.environ:
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               __file__, "--repeats", str(args.repeats)]
        sys.exit(subprocess.run(cmd, env=env, check=False).returncode)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    main_rank = dist.get_rank() == 0
    for kind in ("lora", "full"):
        rows = bench_step(kind, args.repeats)
        if main_rank:
            adamw = rows[0][1]
            print(f"\n### optimizer step, {kind} ({dist.get_world_size()} ranks, FSDP2, "
                  f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})\n")
            print("| optimizer | median ms | min ms | vs AdamW |\n|---|---:|---:|---:|")
            for name, med, low in rows:
                print(f"| {name} | {med:.1f} | {low:.1f} | {med / adamw:.2f}x |")
            print(f"\nours vs torch.optim.Muon on DTensor: {rows[2][1] / rows[1][1]:.1f}x faster")
    if main_rank:
        print(f"\n### Newton-Schulz vs matmul (bf16, 1 process, {torch.get_num_threads()} threads)\n")
        print("| matrix | NS GFLOP/s | matmul GFLOP/s | NS / matmul | NS ms |\n|---|---:|---:|---:|---:|")
        for shape, ns, mm, ms in bench_ns(args.repeats):
            print(f"| {shape} | {ns:.1f} | {mm:.1f} | {ns / mm:.2f} | {ms:.2f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
