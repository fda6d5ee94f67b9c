"""Local lm-eval tasks for the bundled and the user's file tasks, built from their held-out items only.

Each such task becomes `<tasks_dir>/refinery_<name>.yaml` plus `refinery_<name>.jsonl`. The
YAML uses lm-eval 0.4.13's offline route (`dataset_path: json`, absolute `data_files`,
`output_type: multiple_choice`, or `generate_until` with exact match for generative file tasks).
The context is `Item.context()` (`prompt_text(question)`) and each choice is scored as the
continuation " {choice}", the same layout generate's seed answers and the student's training use.
lm-eval tasks (the method's eight, `refinery.core.tasks.STANDARD`, or the user's YAML in
`tasks.include_path`) are passed to lm-eval unchanged, in their own layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from refinery.core import lmeval_docs
from refinery.core.manifest import atomic_path, write_jsonl
from refinery.core.tasks import OFFLINE, Task, TasksConfig, load_task

PREFIX = "refinery_"
"""Local task names get a prefix so they never clash with lm-eval's own (lm-eval has a `siqa` too)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task as the run names it and as lm-eval names it."""

    name: str
    """The name in `tasks.names` (and in results.json)."""
    lm_eval_name: str
    offline: bool
    """Whether refinery wrote the task's files (bundled and file tasks) rather than lm-eval owning it."""
    n: int | None
    """Number of items written for a local task; None for an lm-eval task."""
    metric: str | None = "acc"
    """The task's accuracy metric in lm-eval's results: `acc`, `exact_match` for generative tasks;
    None for lm-eval's tasks (whichever of the two their results hold)."""


def held_out_docs(task: Task, limit: int | None) -> list[dict]:
    """The first `limit` held-out items of a bundled or file task as lm-eval docs (deterministic)."""
    held = list(task.held if limit is None else task.held[:limit])
    if task.kind == "generate":
        return [{"id": it.id, "question": it.question, "prompt": it.context(), "answers": list(it.answers)}
                for it in held]
    return [{"id": it.id, "question": it.question, "prompt": it.context(),
             "choices": list(it.choices), "answer": it.answer} for it in held]


def task_yaml(lm_eval_name: str, data_file: Path) -> dict:
    """The lm-eval task config of one local multiple-choice JSONL file (fields as in `held_out_docs`)."""
    return {**_local(lm_eval_name, data_file),
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
            "metadata": {"version": 1.0}}


# Exact match after normalization: case, punctuation and spacing do not count. (Articles do: removing
# them would turn letter answers such as "A" into "", which any blank reply would then match.)
IGNORE = [r"\s+"]
NO_ANSWER = "\u2205"
"""What a reply the answer regex does not match becomes: no reference can equal it."""


def generative_yaml(lm_eval_name: str, data_file: Path, task: Task) -> dict:
    """A generative task: greedy answer up to a newline, the regex's match (or the trimmed reply)
    compared by exact match with each reference answer."""
    pattern = task.answer_regex or r"\S(?:.*\S)?"
    return {**_local(lm_eval_name, data_file),
            "output_type": "generate_until",
            "doc_to_text": "prompt",
            "doc_to_target": "answers",
            "generation_kwargs": {"until": list(task.until), "max_gen_toks": task.max_new_tokens, "do_sample": False},
            "filter_list": [{"name": "extract", "filter": [
                {"function": "regex", "regex_pattern": pattern, "group_select": 0, "fallback": NO_ANSWER},
                {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": True, "regexes_to_ignore": IGNORE}],
            "metadata": {"version": 1.0}}


def _local(lm_eval_name: str, data_file: Path) -> dict:
    return {"task": lm_eval_name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}}, "test_split": "test"}


def build_tasks(tasks: TasksConfig, tasks_dir: str | Path) -> list[TaskSpec]:
    """Write YAML + JSONL for every bundled and file task in `tasks.names`; return the specs in order."""
    tasks_dir = Path(tasks_dir)
    tasks_dir.mkdir(parents=True, exist_ok=True)
    specs = []
    for name in tasks.names:
        custom = tasks.custom.get(name)
        if name not in OFFLINE and (custom is None or custom.file is None):  # lm-eval's task, its own metric
            specs.append(TaskSpec(name, name, offline=False, n=None, metric=None))
            continue
        task = load_task(tasks, name)
        metric = "exact_match" if task.kind == "generate" else "acc"
        docs = held_out_docs(task, tasks.eval_limit)
        if not docs:
            raise ValueError(f"task {name!r} has no held-out items at tasks.eval_fraction="
                             f"{tasks.eval_fraction}: raise tasks.eval_fraction")
        lm_name = PREFIX + name
        data = tasks_dir / f"{lm_name}.jsonl"
        write_jsonl(data, docs)
        spec = generative_yaml(lm_name, data, task) if task.kind == "generate" else task_yaml(lm_name, data)
        with atomic_path(tasks_dir / f"{lm_name}.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(spec, sort_keys=False))
        specs.append(TaskSpec(name, lm_name, offline=True, n=len(docs), metric=metric))
    return specs


def task_manager(specs: list[TaskSpec], tasks_dir: str | Path, include_path: str | None = None):
    """An lm-eval TaskManager that knows the local tasks, the user's include_path, and lm-eval's own
    only when needed."""
    tm = lmeval_docs.task_manager([tasks_dir, include_path], [s.lm_eval_name for s in specs])
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
