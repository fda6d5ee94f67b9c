"""Resumable training state: `distill/checkpoints/step-NNNNNN/`, each written atomically.

Every rank writes its own files (its shard of the trainable weights as safetensors, its
optimizer + scheduler state with torch.save, read back with weights_only=True, its RNG
state); rank 0 writes state.json last (step, data position, world size, strategy, and the
resume key: a hash of everything that shapes the loss curve, so a checkpoint from another
config or other data is never resumed). The directory is renamed into place only when every
rank has written: a kill leaves either the whole checkpoint or none of it.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from refinery.core.manifest import file_records, verify_outputs, write_json

log = logging.getLogger("refinery.train")
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE = "state.json"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a param: the shard of a DTensor (FSDP2), the partition of a ZeRO-3
    param, else the tensor itself (a view: copy_ into it updates the param)."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    return t.to_local() if hasattr(t, "to_local") else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return _part(t).detach().cpu().contiguous()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's shards of the trainable params, by name."""
    return {n: _local(p) for n, p in model.named_parameters() if p.requires_grad}


def _local_optimizer_state(optimizer) -> dict:
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: _local(v) if torch.is_tensor(v) else v for k, v in st.items()}
                   for i, st in sd["state"].items()}
    return sd


def _reshard_optimizer_state(optimizer) -> None:
    """After load_state_dict: turn the loaded local shards back into DTensors like their params."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not hasattr(p, "to_local") or p not in optimizer.state:
                continue
            from torch.distributed.tensor import DTensor

            st = optimizer.state[p]
            for k, v in st.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.to_local().shape:
                    st[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                               shape=p.shape, stride=p.stride())


def _rank_file(name: str, rank: int, suffix: str) -> str:
    return f"{name}-rank{rank:05d}.{suffix}"


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: dict, world=None) -> Path:
    """Write step-NNNNNN/ with every rank's shard; collective when world.size > 1."""
    from refinery.train.dist import World

    world = world or World()
    out = step_dir(root, step)
    tmp = [None]
    if world.main:
        Path(root).mkdir(parents=True, exist_ok=True)
        tmp = [tempfile.mkdtemp(prefix=f".{out.name}.", dir=root)]
    if world.size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(tmp, src=0)
    tmp_dir = Path(tmp[0])
    r = world.rank
    save_file(trainable_state(model), str(tmp_dir / _rank_file("adapter", r, "safetensors")))
    opt = optimizer.state_dict() if world.strategy == "deepspeed" else _local_optimizer_state(optimizer)
    torch.save({"optimizer": opt, "scheduler": scheduler.state_dict()}, tmp_dir / _rank_file("optimizer", r, "pt"))
    torch.save(rng_state(), tmp_dir / _rank_file("rng", r, "pt"))
    world.barrier()
    if world.main:  # every rank's files are written: record them, so a damaged checkpoint is never resumed
        write_json(tmp_dir / STATE, {**state, "step": step, "world_size": world.size, "strategy": world.strategy,
                                     "files": file_records(tmp_dir, ["."])})
        if out.exists():
            shutil.rmtree(out)
        tmp_dir.rename(out)
    world.barrier()
    return out


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / STATE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def clean(root: Path, keep: int) -> None:
    """Drop all but the newest `keep` checkpoints, and temp dirs a killed writer left behind."""
    root = Path(root)
    if not root.is_dir():
        return
    for d in root.iterdir():
        if d.name.startswith(".step-"):  # a writer killed mid-checkpoint
            shutil.rmtree(d, ignore_errors=True)
    for _, d in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def latest_checkpoint(root: Path, resume_key: str, max_step: int | None = None) -> Path | None:
    """The newest intact checkpoint written for `resume_key`, at most at `max_step`. Stale ones
    (other config, or past the run's last step) are removed; a damaged one (a file truncated,
    missing or changed since it was written) is removed with a warning and the one before it is taken."""
    for step, d in reversed(complete_checkpoints(root)):
        if max_step is not None and step > max_step:
            log.warning("checkpoint %s is past this run's last step (%d): removing it", d, max_step)
            shutil.rmtree(d, ignore_errors=True)
            continue
        try:
            state = json.loads((d / STATE).read_text())
        except (OSError, ValueError) as e:
            state, problems = {}, [f"{STATE} is unreadable ({e})"]
        else:  # checkpoints from before file records: taken as they are
            problems = verify_outputs(d, {"files": state["files"]}) if "files" in state else []
        if not problems and state.get("resume_key") != resume_key:
            log.warning("checkpoint %s was written for another config or other data (key %s, now %s): "
                        "removing it", d, state.get("resume_key"), resume_key)
        elif problems:
            log.warning("checkpoint %s is damaged (%s): removing it, falling back to the one before",
                        d, "; ".join(problems[:3]))
        else:
            return d
        shutil.rmtree(d, ignore_errors=True)
    return None


def check_visible(path: Path, world) -> None:
    """Every rank must see the checkpoint rank 0 chose, its own files included: a node whose run_dir
    is not the shared one would otherwise fail somewhere inside the load, or train from step 0."""
    files = [_rank_file(n, world.rank, x) for n, x in (("adapter", "safetensors"), ("optimizer", "pt"), ("rng", "pt"))]
    sees = (path / STATE).is_file() and all((path / f).is_file() for f in files)
    blind = [float(r == world.rank and not sees) for r in range(world.size)]
    ranks = [r for r, v in enumerate(world.sum(blind)) if v]
    if ranks:
        where = ", ".join(f"rank {r}" + (f" on {world.hosts[r]}" if world.hosts else "") for r in ranks)
        raise RuntimeError(f"checkpoint {path} (chosen by rank 0{' on ' + world.hosts[0] if world.hosts else ''}) "
                           f"is not visible to {where}: every node must see run_dir at the same path on a shared "
                           "filesystem (NFS, Lustre, ...); checkpoints, the top-k cache and the sweep's trial dirs "
                           "live there")


def load_checkpoint(path: Path, model, optimizer, scheduler, world=None) -> dict:
    """Restore this rank's weights, optimizer, scheduler and RNG from `path`; return its state.json."""
    from refinery.train.dist import World

    world = world or World()
    path = Path(path)
    state = json.loads((path / STATE).read_text())
    saved = (state.get("world_size", 1), state.get("strategy", "none"))
    if saved != (world.size, world.strategy):
        raise RuntimeError(f"checkpoint {path} was written by {saved[0]} process(es) with strategy {saved[1]}, this "
                           f"run has {world.size} with {world.strategy}: resume with the same --nproc and "
                           f"distill.parallel.strategy, or delete {path.parent} to start over")
    weights = load_file(str(path / _rank_file("adapter", world.rank, "safetensors")))
    params = dict(model.named_parameters())
    missing = sorted({n for n, p in params.items() if p.requires_grad} - set(weights))
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {len(missing)} trainable tensors (e.g. {missing[0]}); "
                           "delete the checkpoints dir to start over")
    with torch.no_grad():
        for name, value in weights.items():
            _part(params[name]).copy_(value)
    if world.strategy == "deepspeed":
        opt = _load_zero_state(path / _rank_file("optimizer", world.rank, "pt"), optimizer, world)
    else:
        opt = torch.load(path / _rank_file("optimizer", world.rank, "pt"), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        _reshard_optimizer_state(optimizer)
    scheduler.load_state_dict(opt["scheduler"])
    set_rng_state(torch.load(path / _rank_file("rng", world.rank, "pt"), map_location="cpu", weights_only=True))
    return state


def _load_zero_state(path: Path, optimizer, world) -> dict:
    """A DeepSpeed ZeRO optimizer's own state dict, read with weights_only=True: only DeepSpeed's
    plain loss-scaler and enum classes are allowed besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum]):
        opt = torch.load(path, map_location="cpu", weights_only=True)
    states = [None] * world.size  # DeepSpeed reads the entry of its own data-parallel rank
    states[world.rank] = opt["optimizer"]
    optimizer.load_state_dict(states, load_from_fp32_weights=True)
    return opt
