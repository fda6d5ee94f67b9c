"""`distill.parallel.launcher=ray`: the distill workers as a Ray Train TorchTrainer.

Ray places the N workers on the cluster (any nodes), sets up the torch process group (gloo on
CPU, NCCL with GPUs) and the RANK / LOCAL_RANK / WORLD_SIZE variables `refinery.train.dist`
checks; each worker then runs the same `refinery.train.worker` code as under torchrun. The
run directory must be on a filesystem every node sees (checkpoints, metrics, the adapter).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from refinery.core.manifest import write_json
from refinery.core.proc import child_env
from refinery.core.rayctl import PrivateRay
from refinery.train.nodes import interface_env
from refinery.train.worker import main

log = logging.getLogger("refinery.train")


def _worker(config: dict) -> None:
    os.chdir(config["cwd"])
    main(config["spec"])


def launch_ray(payload: dict, parallel, out: Path) -> dict:
    """Run the workers under TorchTrainer and return rank 0's result (raises if training failed)."""
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    spec, result = out / "launch.json", out / "result.json"
    write_json(spec, payload)
    result.unlink(missing_ok=True)
    private = PrivateRay(num_cpus=max(parallel.nproc, os.cpu_count() or 1), prefix="rayt-", log_to_driver=True)
    private.start()
    cuda = torch.cuda.is_available()
    trainer = TorchTrainer(
        _worker, train_loop_config={"spec": str(spec.resolve()), "cwd": os.getcwd()},
        scaling_config=ScalingConfig(num_workers=parallel.nproc, use_gpu=cuda),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo", timeout_s=parallel.timeout_s),
        run_config=RunConfig(name="distill", storage_path=str((out / "ray-train").resolve()),
                             failure_config=FailureConfig(max_failures=0),
                             worker_runtime_env={"env_vars": {**child_env(), **interface_env(parallel)}}))
    log.info("distill: Ray Train TorchTrainer with %d workers (%s)", parallel.nproc, "nccl" if cuda else "gloo")
    try:
        trainer.fit()
    except Exception as e:  # a worker died or raised: the same message as under torchrun
        raise RuntimeError(f"distill: the {parallel.nproc} Ray Train workers failed ({type(e).__name__}: {e}); "
                           f"completed checkpoints in {out / 'checkpoints'} are kept: rerun the same command "
                           "to resume from the last one") from e
    finally:
        private.stop()
    if not result.is_file():
        raise RuntimeError(f"distill: the Ray Train workers finished without {result}")
    data = json.loads(result.read_text())
    result.unlink()
    return data
