"""Processes for `distill`: start them (torchrun), join the group, wrap the models.

    refinery distill CONFIG --nproc 2 distill.parallel.strategy=fsdp2

The parent process writes `distill/launch.json` and runs torchrun (`--standalone`, or the c10d
rendezvous of refinery/train/nodes.py across nodes) on `refinery.train.worker`; each worker joins the process group (NCCL with CUDA, else gloo),
checks that the group really has `nproc` ranks (a rank that silently trains alone is the
classic failure of launchers on CPU), and trains its share of every batch. Rank 0 writes
metrics, the manifest inputs and the adapter; every rank writes its shard of a checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


log = logging.getLogger("refinery.train")


@dataclass
class World:
    """This process's place in the job (size 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"
    hosts: list[str] = field(default_factory=list)
    """Each rank's hostname, by rank (filled when distributed; shows where a job's ranks ran)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64 on the wire)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def same_on_all(self, value: str, what: str) -> None:
        """Fail unless every rank computed the same `value` (e.g. the config hash)."""
        if self.size == 1:
            return
        every: list[str] = [""] * self.size
        dist.all_gather_object(every, value)
        if len(set(every)) > 1:
            raise RuntimeError(f"distill: ranks disagree on {what} ({every}); every rank must get the same "
                               "config, data and models")


def launched() -> bool:
    """True inside a torchrun worker."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def cuda_device(local_rank: int) -> torch.device:
    """GPU path: one device per local rank."""
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init(parallel) -> World:
    """Join the process group of a torchrun job and check its size; World() when not distributed."""
    if parallel.strategy == "none":
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return World(device=dev)
    if not launched():
        raise RuntimeError(f"distill.parallel.strategy={parallel.strategy} needs the processes torchrun starts: "
                           "use `refinery distill CONFIG --nproc N` (or run refinery.train.worker under torchrun)")
    env_size, rank, local = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if env_size != parallel.nproc * parallel.nnodes:
        raise RuntimeError(f"torchrun started {env_size} processes but distill.parallel.nproc={parallel.nproc} x "
                           f"nnodes={parallel.nnodes}; launch with --nproc and --nnodes matching the config")
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    dev = cuda_device(local) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=parallel.timeout_s),
                                **({"device_id": dev} if cuda else {}))
    size = dist.get_world_size()
    if size != env_size or dist.get_rank() != rank:
        raise RuntimeError(f"process group has {size} ranks (this is rank {dist.get_rank()}) but torchrun set "
                           f"WORLD_SIZE={env_size} RANK={rank}: the ranks would train independently")
    hosts: list[str] = [""] * size
    dist.all_gather_object(hosts, socket.gethostname())
    return World(rank, size, local, dev, parallel.strategy, hosts)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (the FSDP2 / wrap unit) of a HF causal LM, peft-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"fsdp2: cannot find decoder layers (model.model.layers) in {type(inner).__name__}")
    return list(layers)


def shard(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """FSDP2: each decoder layer its own unit, the rest (embeddings, norm, head) in the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def exit_worker(code: int = 0) -> None:
    """End a torchrun worker: leave the process group, flush, and exit without interpreter teardown.

    At interpreter exit the C++ threads of gloo (and of DeepSpeed's groups) can still be joinable
    while their owners are destroyed; the process then aborts ("terminate called without an active
    exception", SIGABRT) after its work is saved, and torchrun reports the job as failed. Seen once
    in CI on the ZeRO-3 test; `os._exit` after an explicit barrier and destroy skips that teardown.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def wrap_student(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """The module the training step calls: DDP wrapper, FSDP2-sharded model, or the model itself."""
    if world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.local_rank] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if world.strategy == "fsdp2":
        return shard(model, world)
    return model


def launch(payload: dict, parallel, out: Path) -> dict:
    """Run the distill workers under torchrun and return rank 0's result (raises if any rank failed).
    With nnodes > 1 this is node 0: it hosts the rendezvous that the other nodes join (train/nodes.py)."""
    from refinery.core.manifest import write_json
    from refinery.train import nodes

    spec = out / "launch.json"
    write_json(spec, payload)
    result = out / "result.json"
    result.unlink(missing_ok=True)
    where = f" ({parallel.nproc} on each of {parallel.nnodes} nodes)" if parallel.nnodes > 1 else ""
    many = parallel.nproc * parallel.nnodes
    run_dir = Path(payload["run_dir"])
    attempt = nodes.new_attempt(run_dir, spec) if parallel.nnodes > 1 else ""
    code, signum = -1, None
    try:
        code, signum = nodes.agent(parallel, spec, f"distill: launching {many} processes{where}", attempt)
    finally:
        if attempt:  # the other nodes read it (a late one then knows there is nothing to join)
            nodes.announce(run_dir, status="done" if code == 0 and result.is_file() else "failed", attempt=attempt)
    if signum:
        from refinery.train.preempt import Preempted

        raise Preempted(-1, signum)
    if code != 0 or not result.is_file():
        gone = nodes.absent(run_dir, parallel.nnodes, attempt) if attempt else []
        if gone:
            raise RuntimeError(
                f"distill: node(s) {', '.join(map(str, gone))} of {parallel.nnodes} never joined the rendezvous at "
                f"{nodes.endpoint(parallel)} within {parallel.timeout_s} s (no marker in {nodes.job_dir(run_dir)}): "
                f"start `refinery distill CONFIG --nnodes {parallel.nnodes} --node-rank R` on each (same config; "
                "run_dir on a filesystem every node sees at the same path)")
        others = " and the other nodes' logs (a node that cannot reach the endpoint fails there)" if attempt else ""
        raise RuntimeError(f"distill: the {many} training processes{where} failed (torchrun exit code {code}); see the "
                           f"log above{others}. Completed checkpoints in {out / 'checkpoints'} are kept: rerun the "
                           "same command to resume from the last one")
    data = json.loads(result.read_text())
    result.unlink()
    return data
