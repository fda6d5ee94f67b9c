"""The distill stage: train in this process, or start the workers (torchrun or Ray Train) that do.

Launching is kept out of `trainer` (which the workers import) so that no import runs in a circle.
"""
from __future__ import annotations

from refinery.core.config import to_dict
from refinery.core.stage import Context, Result
from refinery.train import dist
from refinery.train.config import DistillConfig
from refinery.train.ray_launch import launch_ray
from refinery.train.trainer import train


def run(ctx: Context, cfg: DistillConfig, *, stop_after: int | None = None) -> Result:
    """The distill stage: train here, or start `distill.parallel.nproc` processes under torchrun."""
    if cfg.parallel.strategy == "none" or dist.launched():
        return train(ctx, cfg, stop_after=stop_after)
    payload = {"run_dir": str(ctx.run_dir), "seed": ctx.seed, "models": to_dict(ctx.models),
               "tasks": to_dict(ctx.tasks), "distill": to_dict(cfg), "stop_after": stop_after,
               "dirs": {k: str(v) for k, v in ctx.dirs.items()}}
    if cfg.parallel.launcher == "ray":
        got = launch_ray(payload, cfg.parallel, ctx.stage_dir("distill"))
    else:
        got = dist.launch(payload, cfg.parallel, ctx.stage_dir("distill"))
    return Result(got["metrics"], got["outputs"])
