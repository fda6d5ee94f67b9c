"""An lm-eval task (standard, or the user's YAML in tasks.include_path) as seed and held-out items.

Seeds come from the task's training documents (validation ones when it has a test split but no
training split); the held-out items are the documents lm-eval evaluates (test, else validation).
Each item keeps the task's own layout: `prompt` is lm-eval's `doc_to_text`, joined to an answer
by its `target_delimiter`, so generate's seed answers use exactly the context evaluate scores.
"""
from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path

from refinery.core.config import ConfigError
from refinery.core.items import Item, Task, drop_overlap

log = logging.getLogger("refinery")


def lmeval_task(name: str, include_path: str | None, description: str, bundled: tuple[str, ...] = ()) -> Task:
    """`bundled`: the bundled task names, for the error when `name` is none of them and no lm-eval task."""
    return _load(name, include_path, _stamp(include_path), description, bundled)


def _stamp(include_path: str | None) -> tuple:
    """Sizes and mtimes of the include_path's files: an edited YAML or data file is reloaded."""
    if include_path is None:
        return ()
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(include_path).rglob("*"))
                 if p.is_file())


def task_manager(include_paths: list, names: list[str] = ()):
    """An lm-eval TaskManager over `include_paths` (dirs of task YAMLs; None entries skipped). lm-eval's
    own index of thousands of built-in YAMLs (seconds) is read only when there are no paths or one of
    `names` is not among them."""
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).resolve()) for p in include_paths if p]
    tm = TaskManager(include_path=paths or None, include_defaults=not paths)
    if paths and any(n not in tm.all_tasks for n in names):
        tm = TaskManager(include_path=paths, include_defaults=True)
    return tm


@lru_cache(maxsize=16)
def _load(name: str, include_path: str | None, stamp: tuple, description: str, bundled: tuple[str, ...]) -> Task:
    tm = task_manager([include_path], [name])
    if name not in tm.all_tasks:
        where = f" or in tasks.include_path ({include_path})" if include_path else ""
        raise ConfigError(f"tasks.names: {name!r} is neither a bundled task ({', '.join(bundled)}), nor a file "
                          f"task in tasks.custom, nor an lm-eval task{where}: define it under tasks.custom "
                          "with a file, or fix the name")
    try:
        loaded = tm.load([name])["tasks"]
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise ConfigError(f"task {name!r}: lm-eval could not load its documents: {type(e).__name__}: {e}. "
                          "Offline, give its data as local files (dataset_path: json) or pre-download it "
                          "into the HF datasets cache with HF_DATASETS_OFFLINE=1") from e
    if len(loaded) != 1:
        raise ConfigError(f"tasks.names: {name!r} is an lm-eval group of {len(loaded)} tasks: name its "
                          f"tasks one by one ({', '.join(sorted(loaded)[:5])}...)")
    task = next(iter(loaded.values()))
    kind = {"multiple_choice": "multiple_choice", "generate_until": "generate"}.get(task.OUTPUT_TYPE)
    if kind is None:
        raise ConfigError(f"task {name!r}: output_type {task.OUTPUT_TYPE!r} is not supported; use a "
                          "multiple_choice or generate_until task")
    if task.has_training_docs():
        seed_docs = task.training_docs()
    elif task.has_test_docs() and task.has_validation_docs():
        seed_docs = task.validation_docs()
    else:
        raise ConfigError(f"task {name!r}: lm-eval gives it only one split, so there is nothing to draw seeds "
                          "from without touching its held-out documents: give it a training_split (or "
                          "validation_split besides test_split), or use a task file under tasks.custom")
    held_docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    delim = task.config.target_delimiter if kind == "multiple_choice" else ""
    yamls = sorted(Path(include_path).rglob("*.yaml")) if include_path else []
    # The user's YAMLs (until, metric, filters) and the documents; not lm-eval's config object, whose
    # repr holds function addresses that differ in every process.
    h = hashlib.sha256(json.dumps([p.read_text() for p in yamls]).encode())
    try:
        held = [_item(task, d, kind, delim) for d in held_docs]
        seed = drop_overlap([_item(task, d, kind, delim) for d in seed_docs], held)
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        # e.g. winogrande: several contexts per doc, the target a continuation that is not a choice.
        # lm-eval still scores it; generate gets no seed items from it (only its description).
        log.warning("task %r: its documents are not one context + choices (%s): generate seeds it from "
                    "its description only", name, e)
        return Task(name, description, kind, "lm_eval", (), (), h.hexdigest()[:16], opaque=True)
    h.update(json.dumps([[it.prompt, it.choices, it.answer, it.answers] for it in seed + held]).encode())
    gen = task.config.generation_kwargs or {}
    until = tuple(gen.get("until") or ["\n"]) if kind == "generate" else ("\n",)
    return Task(name, description, kind, "lm_eval", tuple(seed), tuple(held), h.hexdigest()[:16], until=until,
                max_new_tokens=int(gen.get("max_gen_toks", 256)) if kind == "generate" else 32)


def _item(task, doc: dict, kind: str, delim: str) -> Item:
    text = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if not isinstance(text, str):
        raise TypeError(f"doc_to_text gives {type(text).__name__}, not a string")
    ident = hashlib.sha256(json.dumps([text, str(target)]).encode()).hexdigest()[:12]
    if kind == "multiple_choice":
        choices = tuple(task.doc_to_choice(doc))
        answer = target if isinstance(target, int) else choices.index(target)
        return Item(ident, text.strip(), choices, answer, prompt=text, delimiter=delim)
    answers = tuple(str(t) for t in target) if isinstance(target, list) else (str(target),)
    return Item(ident, text.strip(), (), -1, answers, prompt=text, delimiter=delim or " ")
