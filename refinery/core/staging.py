"""Re-runs that keep the last good outputs: a stage over complete outputs writes into
`<stage>.new/` and is swapped in only once its manifest is written.

A first run (no complete manifest in the stage dir) writes in place: there is nothing good to keep,
and a killed first run resumes from what it left there. A killed re-run leaves `<stage>.new/`; the
next re-run of a resuming stage (distill, teacher-logits) continues from it, the others start it over.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from refinery.core.manifest import MANIFEST, read_manifest, replace_dir

log = logging.getLogger("refinery")


def staging_dir(out: Path) -> Path:
    return out.with_name(f"{out.name}.new")


def _complete(d: Path) -> bool:
    m = read_manifest(d)
    return bool(m and m.get("status") == "complete")


def recover(out: Path) -> None:
    """Finish a swap that a kill cut between its two renames (the stage dir moved aside, the
    complete staging dir not yet in its place)."""
    new = staging_dir(out)
    if not out.exists() and _complete(new):
        new.rename(out)
        log.info("%s: completed the swap of %s that an interrupted run left", out.name, new.name)
    for old in out.parent.glob(f".{out.name}.old.*") if out.parent.is_dir() else []:
        shutil.rmtree(old, ignore_errors=True)


def begin(out: Path, carry: tuple[str, ...]) -> Path:
    """The dir a run of this stage writes into: `out` itself when it holds no complete outputs,
    else its staging dir, started from the `carry` files (of an earlier killed re-run if one left
    them, else of the complete outputs)."""
    recover(out)
    if not _complete(out):
        out.mkdir(parents=True, exist_ok=True)
        return out
    new = staging_dir(out)
    if new.exists() and not carry:
        shutil.rmtree(new)
    if not new.exists():
        tmp = new.with_name(f".{new.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for pattern in carry:
            for src in sorted(out.glob(pattern)):
                _copy(src, tmp / src.name)
        tmp.rename(new)  # a kill while copying leaves only the temp dir, never a half-filled staging dir
    (new / MANIFEST).unlink(missing_ok=True)
    log.info("%s: writing to %s; the complete outputs in %s stay until it finishes", out.name, new, out)
    return new


def _copy(src: Path, dst: Path) -> None:
    """Hard-link what stages only ever replace (checkpoints, shards: written to a temp path and
    renamed), copy the logs they append to."""
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    if str(src).endswith(".jsonl"):
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def finish(work: Path, out: Path) -> None:
    """Swap a completed staging dir in for the stage dir (nothing to do for an in-place run)."""
    if work != out:
        replace_dir(work, out)
