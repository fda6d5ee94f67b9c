"""Run under torchrun by test_dist_muon.py: DistMuon steps on fixed params and gradients.

    torchrun --nproc_per_node 2 muon_worker.py {replicated|sharded} OUT.safetensors
"""
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from refinery.train.dist_muon import DistMuon

SHAPES = [(48, 12), (12, 48), (33, 20), (7, 30), (16, 16)]  # tall, wide, odd rows (uneven shards)
STEPS = 3


def make_params_and_grads():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def main(mode: str, out: str) -> None:
    dist.init_process_group("gloo")
    params, grads = make_params_and_grads()
    if mode == "sharded":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        ps = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in params]
        to_grad = lambda t: distribute_tensor(t, mesh, [Shard(0)])
    else:
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        to_grad = lambda t: t.clone()
    opt = DistMuon(ps, lr=0.02, momentum=0.95, weight_decay=0.1, lr_scale="original")
    for step in grads:
        for p, g in zip(ps, step):
            p.grad = to_grad(g)
        opt.step()
    full = {f"p{i}": (p.full_tensor() if mode == "sharded" else p).detach().contiguous() for i, p in enumerate(ps)}
    calls = torch.tensor([opt.ns_calls])
    every = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(every, calls)
    if dist.get_rank() == 0:
        save_file({**full, "ns_calls": torch.cat(every)}, out)
    from refinery.train.dist import exit_worker

    exit_worker(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
