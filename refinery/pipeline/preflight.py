"""Checks that need no model weights, run by `refinery check` and before any stage's work.

Each failure is a ConfigError naming the key, the value and the fix: a run whose config cannot
work fails in seconds, not when its third stage starts.
"""
from __future__ import annotations

import os
from pathlib import Path

from refinery.core import runner
from refinery.core.config import ConfigError
from refinery.core.weights import check_weights
from refinery.pipeline import stages


def preflight(cfg, names: list[str] | None = None) -> None:
    """Raise ConfigError (InputError for broken weight files) on the first problem: the run-wide
    checks, then each wanted stage's own (of `names`, None: all; core.stage.Stage.preflight)."""
    check_run_dir(Path(cfg.run_dir))
    check_models(cfg.models)
    runner.preflight(cfg, stages.STAGES, names)


def check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {str(run_dir)!r} is a file, not a directory: pass another run_dir")
    parent = next((p for p in [run_dir, *run_dir.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"run_dir: cannot create {str(run_dir)!r} ({parent} is not writable): pass another run_dir")


def _needs_own_code(path: Path) -> bool:
    import json

    try:
        return "auto_map" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False  # an unreadable config.json is for the loader to name


def check_models(models) -> None:
    from refinery.core import gguf_import as gi

    for key, spec in (("models.teacher", models.teacher), ("models.student.path", models.student.path)):
        if not spec or spec in gi.REGISTRY:
            continue
        path = Path(spec)
        if spec.endswith(".gguf"):
            if not path.is_file():
                raise ConfigError(f"{key}: GGUF file {spec!r} not found")
            continue
        if path.exists():
            if not (path / "config.json").is_file():
                raise ConfigError(f"{key}: {spec!r} holds no model (no config.json): pass an HF model directory, "
                                  f"a .gguf file, or one of {', '.join(gi.REGISTRY)}")
            if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
                raise ConfigError(f"{key}: {spec!r} has a config.json but no weight files (*.safetensors)")
            if not models.trust_remote_code and _needs_own_code(path):
                raise ConfigError(f"{key}: {spec!r} needs the model's own Python code (auto_map in its "
                                  "config.json), which is not run by default: set models.trust_remote_code=true "
                                  "if you trust that code")
            continue
        if spec.startswith((".", "/")):
            raise ConfigError(f"{key}: path {spec!r} not found")
        if gi.imported_dir(spec) is None and os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(spec):
            raise ConfigError(f"{key}: {spec!r} is not a registry name ({', '.join(gi.REGISTRY)}), a local path, "
                              "or an imported model, and HF_HUB_OFFLINE=1 with no copy in the hub cache: "
                              "`refinery models import FILE.gguf --name NAME`, or pass an HF model directory")
    for key, spec in (("models.teacher", models.teacher), ("models.student.path", models.student.path)):
        where = gi.model_dir(spec)
        if where is not None:
            check_weights(where, key)


def _in_hub_cache(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:  # an invalid repo id and the like: not in the cache
        return False
