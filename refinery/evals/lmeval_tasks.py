"""Local lm-eval tasks for the offline benchmarks, built from their held-out items only.

Each offline task becomes `<tasks_dir>/refinery_<name>.yaml` plus `refinery_<name>.jsonl`. The
YAML uses lm-eval 0.4.13's offline route (`dataset_path: json`, absolute `data_files`,
`output_type: multiple_choice`). The context is `refinery.core.prompts.prompt_text(question)` and
each choice is scored as the continuation " {choice}", the same layout the student is trained on.
Task names that are not offline tasks are passed to lm-eval unchanged (e.g. the method's eight,
`refinery.core.tasks.STANDARD`) for machines that have their data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from refinery.core.manifest import atomic_path, write_jsonl
from refinery.core.prompts import prompt_text
from refinery.core.tasks import OFFLINE, TasksConfig, split

PREFIX = "refinery_"
"""Local task names get a prefix so they never clash with lm-eval's own (lm-eval has a `siqa` too)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task as the run names it and as lm-eval names it."""

    name: str
    """The name in `tasks.names` (and in results.json)."""
    lm_eval_name: str
    offline: bool
    n: int | None
    """Number of items written for an offline task; None for a standard lm-eval task."""


def held_out_docs(name: str, eval_fraction: float, limit: int | None) -> list[dict]:
    """The first `limit` held-out items of offline task `name` as lm-eval docs (deterministic)."""
    _, held = split(name, eval_fraction)
    if limit is not None:
        held = held[:limit]
    return [{"id": it.id, "question": it.question, "prompt": prompt_text(it.question),
             "choices": list(it.choices), "answer": it.answer} for it in held]


def task_yaml(lm_eval_name: str, data_file: Path) -> dict:
    """The lm-eval task config of one local JSONL file (fields named as in `held_out_docs`)."""
    return {
        "task": lm_eval_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        # Plain field names: lm-eval reads the doc field directly, no Jinja escaping of the text.
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def build_tasks(tasks: TasksConfig, tasks_dir: str | Path) -> list[TaskSpec]:
    """Write YAML + JSONL for every offline task in `tasks.names`; return the specs in order."""
    tasks_dir = Path(tasks_dir)
    tasks_dir.mkdir(parents=True, exist_ok=True)
    specs = []
    for name in tasks.names:
        if name not in OFFLINE:
            specs.append(TaskSpec(name, name, offline=False, n=None))
            continue
        docs = held_out_docs(name, tasks.eval_fraction, tasks.eval_limit)
        if not docs:
            raise ValueError(f"task {name!r} has no held-out items at tasks.eval_fraction="
                             f"{tasks.eval_fraction}: raise tasks.eval_fraction")
        lm_name = PREFIX + name
        data = tasks_dir / f"{lm_name}.jsonl"
        write_jsonl(data, docs)
        with atomic_path(tasks_dir / f"{lm_name}.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(task_yaml(lm_name, data), sort_keys=False))
        specs.append(TaskSpec(name, lm_name, offline=True, n=len(docs)))
    return specs


def task_manager(specs: list[TaskSpec], tasks_dir: str | Path):
    """An lm-eval TaskManager that knows the local tasks (and lm-eval's own only when needed)."""
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's thousands of built-in YAMLs costs seconds: skip it for offline-only runs.
    need_defaults = any(not s.offline for s in specs)
    tm = TaskManager(include_path=str(Path(tasks_dir).resolve()), include_defaults=need_defaults)
    unknown = [s.name for s in specs if s.lm_eval_name not in tm.all_tasks]
    if unknown:
        raise ValueError(f"tasks.names: {', '.join(map(repr, unknown))} is neither an offline task "
                         f"({', '.join(OFFLINE)}) nor an lm-eval task name (e.g. {', '.join(_standard())})")
    return tm


def check_loadable(specs: list[TaskSpec], tm) -> None:
    """Load every task's data once now, so a task whose data is missing fails by name, early."""
    for spec in specs:
        try:
            tm.load([spec.lm_eval_name])
        except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
            where = "its data" if spec.offline else "its dataset (from the HF hub or the local HF cache)"
            raise RuntimeError(
                f"task {spec.name!r}: lm-eval could not load {where}: {type(e).__name__}: {e}. "
                f"Offline, use the bundled tasks ({', '.join(OFFLINE)}), or pre-download the dataset "
                "into the HF datasets cache and set HF_DATASETS_OFFLINE=1") from e


def _standard() -> list[str]:
    from refinery.core.tasks import STANDARD

    return STANDARD
