"""Resumable training state: `distill/checkpoints/step-NNNNNN/`, each written atomically.

A checkpoint holds the trainable (LoRA) weights as safetensors, optimizer + scheduler state
(torch.save, read back with weights_only=True), the RNG states, and state.json (step, data
position, and the resume key: a hash of everything that shapes the loss curve, so a
checkpoint from another config or other data is never resumed).
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from refinery.core.manifest import atomic_path, write_json

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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: dict) -> Path:
    """Write step-NNNNNN/ atomically (a kill leaves either the whole dir or none of it)."""
    out = step_dir(root, step)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), str(tmp / "adapter.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        write_json(tmp / STATE, {**state, "step": step})
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
        if d.name.startswith(".step-"):
            shutil.rmtree(d, ignore_errors=True)
    for _, d in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def latest_checkpoint(root: Path, resume_key: str) -> Path | None:
    """The newest complete checkpoint written for `resume_key`; stale ones (other config) are removed."""
    ckpts = complete_checkpoints(root)
    for _, d in ckpts:
        key = json.loads((d / STATE).read_text()).get("resume_key")
        if key != resume_key:
            log.warning("checkpoint %s was written for another config or other data (key %s, now %s): "
                        "removing it and starting over", d, key, resume_key)
            shutil.rmtree(d, ignore_errors=True)
    ckpts = complete_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `path`; return its state.json."""
    path = Path(path)
    weights = load_file(str(path / "adapter.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(n for n, p in params.items() if p.requires_grad) - set(weights))
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {len(missing)} trainable tensors (e.g. {missing[0]}); "
                           "delete the checkpoints dir to start over")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
    return json.loads((path / STATE).read_text())
