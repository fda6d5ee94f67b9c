"""Shared fixtures: tiny *real* models cut from the bundled SmolLM2-135M-Instruct.

The full model is converted once and cached in the user's cache dir; the tiny teacher (4
layers) and student (2 layers) are layer subsets of it, so they share its real tokenizer and
real weights while running each stage in seconds.
"""
from __future__ import annotations

import pytest


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
    from refinery.launch.config import load

    def make(**sections):
        overrides = [f"run_dir={tmp_path / 'run'}", f"models.teacher={tiny_teacher}",
                     f"models.student.path={tiny_student}", "tasks.names=[siqa, strategyqa]",
                     "tasks.eval_limit=20"]
        for section, values in sections.items():
            overrides += [f"{section}.{k}={v}" for k, v in values.items()]
        return load(None, overrides)

    return make
