"""Run under torchrun by test_ds_muon.py: DeepSpeed ZeRO-{2,3} steps with its Muon on a tiny model.

    torchrun --nproc_per_node 2 ds_worker.py STAGE OUT.safetensors
"""
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

STEPS = 3
LR = 0.02


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 48, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(48, 16, bias=False))


def batch(step: int, rank: int) -> torch.Tensor:
    """Each rank's half of the global batch of this step."""
    g = torch.Generator().manual_seed(100 + step)
    # 64 rows: full-rank gradients. Newton-Schulz maps the near-zero singular directions of a
    # rank-deficient gradient to ~1, so their bf16 rounding noise would dominate any comparison.
    return torch.randn(64, 24, generator=g).chunk(2)[rank]


def loss_fn(model, x) -> torch.Tensor:
    return (model(x) - 0.5).pow(2).mean()


def main(stage: int, out: str) -> None:
    import deepspeed

    from refinery.train.config import DistillConfig
    from refinery.train.dist import World
    from refinery.train.ds import initialize

    dist.init_process_group("gloo")
    world = World(dist.get_rank(), dist.get_world_size(), strategy="deepspeed")
    cfg = DistillConfig(steps=STEPS, batch_size=64)
    cfg.parallel.zero_stage, cfg.optim.lr, cfg.optim.grad_clip, cfg.optim.warmup_steps = stage, LR, None, 0
    cfg.optim.schedule, cfg.optim.weight_decay = "constant", 0.1
    engine = initialize(make_model(), cfg, world)
    for step in range(STEPS):
        engine.backward(loss_fn(engine, batch(step, world.rank)))
        engine.step()
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        full = {f"p{i}": p.detach().clone().contiguous() for i, p in enumerate(params)}
    if world.main:
        save_file(full, out)
    from refinery.train.dist import exit_worker

    exit_worker(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
