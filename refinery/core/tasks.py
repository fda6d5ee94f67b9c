"""The offline task set: real multiple-choice benchmark items bundled with the package.

Each task's items are split once, deterministically, into a *seed* part (the teacher's
self-instruct seeds) and a held-out *eval* part that no training data is drawn from.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from refinery.core.config import ConfigError, check
from refinery.core.items import Item, Task, bucket, drop_overlap
from refinery.core.lmeval_docs import lmeval_task

DATA = Path(__file__).resolve().parent.parent / "data" / "benchmarks"

# name -> (file, one-line description used in prompts)
OFFLINE = {
    "siqa": ("social_iqa.json", "social situations and people's motivations, reactions and needs"),
    "mmlu_dev": ("mmlu_flan_cot_prompts.json", "exam questions across 57 academic subjects"),
    "strategyqa": ("strategyqa.json", "yes/no questions that need several reasoning steps"),
    "winowhy": ("winowhy.json", "pronoun resolution and whether a stated reason is correct"),
    "physical_intuition": ("physical_intuition.json", "everyday physics and how objects behave"),
    "general_knowledge": ("general_knowledge.json", "general knowledge questions"),
    "riddle_sense": ("riddle_sense.json", "riddles that need commonsense"),
    "logical_deduction": ("logical_deduction_three_objects.json", "ordering three objects from clues"),
}

# The method's eight benchmarks as lm-eval task names, for machines that have their data.
STANDARD = ["mmlu", "arc_easy", "commonsense_qa", "openbookqa", "hellaswag", "piqa", "siqa", "winogrande"]


@dataclass
class CustomTask:
    """A task of the user's own: a file of items, or an lm-eval task with a description."""

    file: str | None = None
    """A JSONL or BIG-bench JSON file of the task's items (README, "Your own task"); null: the
    task's name is an lm-eval task (standard, or in tasks.include_path)."""
    description: str = ""
    """One line on what the task is about; the teacher's self-instruct prompts use it."""
    answer_regex: str | None = None
    """Generative tasks: the answer is this regex's first match (its first group, if it has one)
    in the model's reply; null: the whole reply, trimmed."""
    max_new_tokens: int = 32
    """Generative tasks: the most tokens an answer may take."""

    def __post_init__(self):
        if self.file is not None:
            check(bool(self.description.strip()), "description", self.description,
                  "one line on what the task is about (the teacher's prompts use it)")
        if self.answer_regex is not None:
            try:
                re.compile(self.answer_regex)
            except re.error as e:
                check(False, "answer_regex", self.answer_regex, f"a valid regular expression ({e})")
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "a positive integer")


@dataclass
class TasksConfig:
    """Which tasks the run targets and how their items are split."""

    names: list[str] = field(default_factory=lambda: ["siqa", "mmlu_dev", "strategyqa", "winowhy",
                                                     "physical_intuition"])
    """Bundled task names (refinery.core.tasks.OFFLINE), names defined in `custom`, or lm-eval task names."""
    eval_fraction: float = 0.5
    """Share of each task's items held out for evaluation (the rest seed data generation); items with
    their own `split` and lm-eval tasks keep their splits."""
    eval_limit: int | None = 200
    """At most this many held-out items per task are scored (None: all)."""
    custom: dict[str, CustomTask] = field(default_factory=dict)
    """The user's own tasks by name: {file, description, answer_regex, max_new_tokens}."""
    include_path: str | None = None
    """A directory of the user's own lm-eval task YAMLs (named in `names`)."""

    def __post_init__(self):
        check(bool(self.names), "names", self.names, "at least one task name")
        check(len(set(self.names)) == len(self.names), "names", self.names, "each task once")
        check(0.0 < self.eval_fraction < 1.0, "eval_fraction", self.eval_fraction, "a number in (0, 1)")
        check(self.eval_limit is None or self.eval_limit > 0, "eval_limit", self.eval_limit, "a positive integer or null")
        for name in self.custom:
            check(name not in OFFLINE, f"custom.{name}", name, "a name that is not a bundled task's: rename it")
            check(name in self.names, f"custom.{name}", name, f"a task listed in tasks.names (add {name!r} there)")
        if self.include_path is not None:
            check(Path(self.include_path).is_dir(), "include_path", self.include_path,
                  "a directory of lm-eval task YAML files")


def _bigbench(path: Path) -> list[Item]:
    items = []
    for ex in json.loads(path.read_text())["examples"]:
        scores = ex.get("target_scores") or {}
        if not scores or max(scores.values()) != 1:
            continue
        choices = tuple(scores)
        answer = [scores[c] for c in choices].index(1)
        q = ex["input"].strip()
        items.append(Item(_id(q), q, choices, answer))
    return items


_MMLU_CHOICE = re.compile(r"\(([A-D])\)\s*(.*?)\s*(?=\([A-D]\)|$)", re.S)


def _mmlu(path: Path) -> list[Item]:
    items = []
    for subject, prompt in json.loads(path.read_text()).items():
        for block in prompt.split("\n\nQ: ")[1:]:
            if "\n(A)" not in block or "The answer is (" not in block:
                continue
            question, rest = block.split("\n(A)", 1)
            options, _, answer_text = ("(A)" + rest).partition("\nA:")
            choices = [m.group(2).strip() for m in _MMLU_CHOICE.finditer(options.strip())]
            letter = answer_text.rsplit("The answer is (", 1)[1][:1]
            if len(choices) != 4 or letter not in "ABCD":
                continue
            q = f"{question.strip()}"
            items.append(Item(_id(subject + q), q, tuple(choices), "ABCD".index(letter)))
    return items


def _id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@lru_cache(maxsize=None)
def load_items(name: str) -> tuple[Item, ...]:
    if name not in OFFLINE:
        raise KeyError(f"{name!r} is not an offline task; known: {', '.join(OFFLINE)}")
    path = DATA / OFFLINE[name][0]
    items = _mmlu(path) if name == "mmlu_dev" else _bigbench(path)
    seen, unique = set(), []
    for it in items:  # some source files repeat questions
        if it.id not in seen:
            seen.add(it.id)
            unique.append(it)
    return tuple(unique)


def split(name: str, eval_fraction: float) -> tuple[list[Item], list[Item]]:
    """(seed items, eval items): stable under reordering, decided by each item's hash."""
    seed, held = [], []
    for it in load_items(name):
        bucket = int(it.id[:8], 16) / 0xFFFFFFFF
        (held if bucket < eval_fraction else seed).append(it)
    return seed, held


def load_task(cfg: TasksConfig, name: str) -> Task:
    """Task `name` of this config: bundled, a file in `custom`, or an lm-eval task. Raises
    ConfigError naming the file, line and field when a user's task data is wrong."""
    custom = cfg.custom.get(name)
    if name in OFFLINE:
        seed, held = split(name, cfg.eval_fraction)
        return Task(name, OFFLINE[name][1], "multiple_choice", "bundled", tuple(seed), tuple(held), None)
    if custom is not None and custom.file is not None:
        p = Path(custom.file)
        st = p.stat() if p.is_file() else None
        return _file_task(name, str(p), st and (st.st_size, st.st_mtime_ns), cfg.eval_fraction, custom.description,
                          custom.answer_regex, custom.max_new_tokens)
    desc = custom.description if custom is not None and custom.description else name
    return lmeval_task(name, cfg.include_path, desc, tuple(OFFLINE))


@lru_cache(maxsize=64)
def _file_task(name, path, stamp, eval_fraction, description, answer_regex, max_new_tokens) -> Task:
    from refinery.core.task_files import file_digest, read_task_file

    kind, rows = read_task_file(path, f"tasks.custom.{name}.file")
    items = [(r["split"], Item(r["id"], r["question"], r["choices"], r["answer"], r["answers"])) for r in rows]
    held = [it for s, it in items if s == "held" or (s is None and bucket(it.id) < eval_fraction)]
    held_ids = {it.id for it in held}
    seed = drop_overlap([it for _, it in items if it.id not in held_ids], held)
    return Task(name, description, kind, "file", tuple(seed), tuple(held), file_digest(path), answer_regex,
                max_new_tokens)


def task_digests(cfg: TasksConfig) -> dict[str, str]:
    """{name: data hash} of the run's non-bundled tasks (part of generate's and evaluate's identity)."""
    return {n: load_task(cfg, n).digest for n in cfg.names if n not in OFFLINE}


def check_tasks(cfg: TasksConfig, need_seeds: int = 0) -> None:
    """Every task resolves (bundled, a valid file, or a loadable lm-eval task), has held-out items,
    and (for generate) at least `need_seeds` seed items; a user file's errors name file, line, field."""
    for name in cfg.names:
        task = load_task(cfg, name)
        if task.opaque:  # lm-eval scores it; generate has only its description (logged)
            continue
        fix = (f"add items, or change tasks.eval_fraction (now {cfg.eval_fraction})" if task.source == "file"
               else "use a task with more documents")
        if not task.held:
            raise ConfigError(f"task {name!r}: no held-out items (of {len(task.seed)}): {fix}")
        if len(task.seed) < need_seeds:
            raise ConfigError(f"task {name!r}: its seed split has {len(task.seed)} items, fewer than "
                              f"generate.seeds_per_task={need_seeds}: {fix}, or lower generate.seeds_per_task")
