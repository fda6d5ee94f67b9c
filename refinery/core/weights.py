"""Cheap integrity checks of safetensors files: the header and the file size, no weights read.

A truncated or overwritten-header file then fails before any stage's work, naming the file,
instead of as a SafetensorError traceback when a stage loads it.
"""
from __future__ import annotations

import json
from pathlib import Path

from refinery.core.config import InputError


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (None when its header and size agree)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is {size} bytes, shorter than a safetensors header"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"is {size} bytes, but its header alone claims {n}: truncated, or not a safetensors file"
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "has no valid safetensors header (corrupt, or not a safetensors file)"
    if 8 + n + end != size:
        return f"is {size} bytes, but its header describes {8 + n + end}: truncated or corrupt"
    return None


def check_weights(model_dir: Path, what: str) -> None:
    """Raise InputError naming the first broken *.safetensors file of a model dir."""
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            raise InputError(f"{what}: {f} {problem}: copy, convert or train that model again")
