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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "deepspeed"])
def test_two_gpu_distill_uses_nccl(strategy, tmp_path, tiny_teacher, tiny_student, write_train_data):
    """The GPU path of refinery.train.dist: one device per rank, NCCL, same CLI."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    run = tmp_path / "run"
    write_train_data(run)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run), "models": {"teacher": tiny_teacher, "student": {"path": tiny_student}},
                                   "distill": {"steps": 4, "batch_size": 4, "max_seq_len": 48}}))
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-m", "refinery.launch.cli", "distill", str(cfg), "--nproc", "2",
                           f"distill.parallel.strategy={strategy}"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": root}, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on cuda:0 x 2" in proc.stdout + proc.stderr
    m = json.loads((run / "distill" / "manifest.json").read_text())["metrics"]
    assert m["world_size"] == 2 and m["steps"] == 4
