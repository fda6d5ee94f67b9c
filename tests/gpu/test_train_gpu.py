"""The student side on CUDA: same Muon numbers as on CPU, and the trainer picks the GPU."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_muon_on_cuda_matches_cpu():
    from refinery.train.muon import Muon

    g = torch.Generator().manual_seed(0)
    init = torch.randn(64, 16, generator=g)
    grads = [torch.randn(64, 16, generator=g) for _ in range(4)]
    cpu, gpu = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.cuda())
    opt_cpu, opt_gpu = Muon([cpu], lr=0.02), Muon([gpu], lr=0.02)
    for grad in grads:
        cpu.grad, gpu.grad = grad.clone(), grad.cuda()
        opt_cpu.step()
        opt_gpu.step()
    moved = (cpu - init).abs().max().item()
    assert moved > 0.01
    assert (gpu.detach().cpu() - cpu.detach()).abs().max().item() < 1e-2 * moved


def test_single_process_world_is_cuda():
    from refinery.train.config import ParallelConfig
    from refinery.train.dist import init

    assert init(ParallelConfig()).device.type == "cuda"
