"""Checkpoints record their files; a damaged newest one is skipped for the one before it."""
from __future__ import annotations

import logging

import torch

from refinery.train import checkpoint as ckpt


def _setup(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _train(model, opt, sched, steps: int):
    for _ in range(steps):
        model(torch.randn(2, 8)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    model, opt, sched = _setup(0)
    saved = {}
    for step in (2, 4):
        _train(model, opt, sched, 2)
        ckpt.save_checkpoint(root, step, model, opt, sched, {"resume_key": "k"})
        saved[step] = model.weight.detach().clone()
    assert ckpt.latest_checkpoint(root, "k") == ckpt.step_dir(root, 4)

    adapter = next(ckpt.step_dir(root, 4).glob("adapter-*.safetensors"))
    adapter.write_bytes(adapter.read_bytes()[:100])  # truncated, as by a full disk
    with caplog.at_level(logging.WARNING, logger="refinery.train"):
        latest = ckpt.latest_checkpoint(root, "k")
    assert latest == ckpt.step_dir(root, 2) and not ckpt.step_dir(root, 4).exists()
    assert "is damaged" in caplog.text and adapter.name in caplog.text

    fresh, fopt, fsched = _setup(1)
    assert ckpt.load_checkpoint(latest, fresh, fopt, fsched)["step"] == 2
    assert torch.equal(fresh.weight, saved[2])

    (latest / ckpt.STATE).write_text("{")  # torn state.json: nothing left to resume
    assert ckpt.latest_checkpoint(root, "k") is None


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    model, opt, sched = _setup(0)
    ckpt.save_checkpoint(root, 2, model, opt, sched, {"resume_key": "old"})
    assert ckpt.latest_checkpoint(root, "new") is None and not ckpt.step_dir(root, 2).exists()
